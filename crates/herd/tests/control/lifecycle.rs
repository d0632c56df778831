//! `herd stop`, `herd start` (detached) and `herd ls`.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::support::{
    all_pids, cli, home_of, raw_request, ready_pids, settled, socket_of, start_node, start_python,
    status, wait_status, Detached,
};
use crate::util::{fixture, get, pid_alive, pid_in, wait_dead, TempDir};

#[test]
fn stop_leaves_no_worker_and_no_socket() {
    let name = "ctl-stop";
    let mut herd = start_node(name, 2, &[]);
    herd.wait_ready();
    let home = home_of(&herd);
    let s = wait_status(&home, name, "every worker ready", |s| settled(s, 2));
    let pids = all_pids(&s);
    assert_eq!(s["pid"], herd.pid(), "{s:#}");
    let socket = socket_of(&home, name);
    assert!(socket.exists());

    let out = cli(&home, &["stop", name]);
    out.assert_ok();
    assert_eq!(out.stdout.trim(), format!("{name}: stopped"), "{out}");
    // The answer comes once every worker exited (and was reaped): nothing to wait for.
    for pid in &pids {
        assert!(!pid_alive(*pid), "worker {pid} outlived herd stop");
    }
    assert!(
        !socket.exists(),
        "the control socket {} is gone when herd stop returns",
        socket.display()
    );
    let status = herd.expect_exit();
    assert_eq!(status.code(), Some(0), "{}", herd.dump());
    let left: Vec<String> = std::fs::read_dir(&home)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "HERD_HOME is left empty: {left:?}");

    let again = cli(&home, &["status", name]);
    assert_eq!(again.code, Some(1), "{again}");
    assert!(again.stderr.contains("no app named `ctl-stop`"), "{again}");
    let ls = cli(&home, &["ls"]);
    ls.assert_ok();
    assert!(!ls.stdout.contains(name), "{ls}");
}

/// `herd stop` answers "stopped" once the app is gone, so a script may go on with
/// `herd start` of the same name at once. The answer must therefore come after the control
/// socket is removed. Seen at the protocol level (the CLI's own process exit hides most of
/// the window): several rounds, since the order is a race.
#[test]
fn stop_answers_after_the_control_socket_is_gone() {
    let mut early = Vec::new();
    const ROUNDS: usize = 8;
    for round in 0..ROUNDS {
        let name = format!("ctl-stop-{round}");
        let mut herd = start_python(&name, 1, &["--ready", "notify"]);
        herd.wait_ready();
        let socket = socket_of(&home_of(&herd), &name);
        let answer = raw_request(&socket, r#"{"cmd":"stop"}"#);
        let left = socket.exists();
        assert_eq!(answer["ok"], true, "{answer}");
        assert_eq!(answer["message"], "stopped", "{answer}");
        if left {
            early.push(round);
        }
        let status = herd.expect_exit();
        assert_eq!(status.code(), Some(0), "{}", herd.dump());
        assert!(!socket.exists(), "removed once herd exits");
    }
    assert!(
        early.is_empty(),
        "the control socket still existed when \"stopped\" arrived in {} of {ROUNDS} rounds ({early:?})",
        early.len()
    );
}

#[test]
fn restart_replaces_every_worker() {
    let name = "ctl-restart";
    let herd = start_node(name, 2, &[]);
    herd.wait_ready();
    let home = home_of(&herd);
    let before = ready_pids(&wait_status(&home, name, "every worker ready", |s| {
        settled(s, 2)
    }));
    let out = cli(&home, &["restart", name]);
    out.assert_ok();
    assert!(out.stdout.contains("restarted 2 workers"), "{out}");
    let s = status(&home, name);
    assert!(settled(&s, 2), "ready when herd restart returns: {s:#}");
    assert!(ready_pids(&s).is_disjoint(&before), "{before:?} → {s:#}");
    for pid in before {
        assert!(!pid_alive(pid), "old worker {pid} still runs");
    }
}

#[test]
fn start_returns_once_every_worker_is_ready() {
    let dir = TempDir::new();
    let home = dir.join("home");
    let name = "ctl-start";
    let mut guard = Detached::new(&home, name);
    let app = fixture("control_app.js");
    let started = Instant::now();
    let out = cli(
        &home,
        &["start", "-i", "2", "-e", "PORT=0", "--name", name, &app],
    );
    let took = started.elapsed();
    out.assert_ok();
    assert!(out.stdout.contains("started 2 workers"), "{out}");
    let s = status(&home, name);
    guard.learn(&s);
    assert_eq!(
        s["ready"], 2,
        "ready right after herd start returned: {s:#}"
    );
    assert!(settled(&s, 2), "{s:#}");
    eprintln!("herd start took {took:?}");

    let listen = s["listen"][0].as_str().expect("a listen address");
    let port: u16 = listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {listen}"));
    let r = get(port, "/").expect("request to the detached app");
    assert!(ready_pids(&s).contains(&pid_in(&r)), "{s:#}");

    let log = home.join(format!("{name}.log"));
    let text = std::fs::read_to_string(&log).expect("herd start writes a log file");
    assert!(text.contains("control app up"), "{text}");

    // Already running: refused.
    let twice = cli(
        &home,
        &["start", "-i", "1", "-e", "PORT=0", "--name", name, &app],
    );
    assert_eq!(twice.code, Some(1), "{twice}");
    assert!(twice.stderr.contains("already running"), "{twice}");

    let supervisor = guard.supervisor().expect("supervisor pid");
    cli(&home, &["stop", name]).assert_ok();
    assert!(
        wait_dead(supervisor, Duration::from_secs(5)),
        "the supervisor exits"
    );
    for pid in all_pids(&s) {
        assert!(!pid_alive(pid), "worker {pid} outlived herd stop");
    }
    assert!(!socket_of(&home, name).exists());
}

#[test]
fn start_of_an_app_that_crashes_fails_with_its_error() {
    let dir = TempDir::new();
    let home = dir.join("home");
    let app = dir.join("crash.js");
    std::fs::write(
        &app,
        "console.error('about to fail');\nthrow new Error('start-up failure: crash-8812');\n",
    )
    .expect("write the app");
    let app = app.to_string_lossy().into_owned();
    let name = "ctl-crash";
    let _guard = Detached::new(&home, name);
    let started = Instant::now();
    let out = cli(
        &home,
        &[
            "start",
            "-i",
            "2",
            "--restart-delay",
            "10ms",
            "--max-restarts",
            "2",
            "--name",
            name,
            &app,
        ],
    );
    eprintln!("herd start of a crashing app took {:?}", started.elapsed());
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
    assert!(out.stderr.starts_with("error: "), "{out}");
    assert!(out.stderr.contains(name), "{out}");
    assert!(
        out.stderr.contains("start-up failure: crash-8812"),
        "the app's own error text\n{out}"
    );
    // The supervisor gave up and is gone: nothing to stop, no socket left behind.
    let s = cli(&home, &["status", name]);
    assert_eq!(s.code, Some(1), "{s}");
    assert!(s.stderr.contains("no app named"), "{s}");
    assert!(!socket_of(&home, name).exists());
}

/// With the default restart policy a crashing app is retried for a long while (15 unstable
/// restarts with backoff) before herd gives up, so `herd start` stops waiting first. It
/// must still exit 1 and say why the workers are not ready: the app's own error.
#[test]
fn start_of_a_crash_looping_app_names_its_error() {
    let dir = TempDir::new();
    let home = dir.join("home");
    let app = dir.join("crash.js");
    std::fs::write(
        &app,
        "console.error('about to fail');\nthrow new Error('start-up failure: crash-5150');\n",
    )
    .expect("write the app");
    let app = app.to_string_lossy().into_owned();
    let name = "ctl-crash-loop";
    let _guard = Detached::new(&home, name);
    // herd start waits --listen-timeout + 10 s at most: 11 s here.
    let out = cli(
        &home,
        &[
            "start",
            "-i",
            "1",
            "--listen-timeout",
            "1s",
            "--name",
            name,
            &app,
        ],
    );
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("start-up failure: crash-5150"),
        "herd start names the error that keeps the workers from starting\n{out}"
    );
}

#[test]
fn ls_lists_the_running_app() {
    let name = "ctl-ls";
    let herd = start_node(name, 2, &[]);
    herd.wait_ready();
    let home = home_of(&herd);
    wait_status(&home, name, "every worker ready", |s| settled(s, 2));
    let out = cli(&home, &["ls"]);
    out.assert_ok();
    let row = out
        .stdout
        .lines()
        .find(|l| l.contains(name))
        .unwrap_or_else(|| panic!("no row for {name}\n{out}"));
    assert!(row.contains("running"), "{row}");
    assert!(row.contains("2/2"), "{row}");
    assert!(row.contains("round-robin"), "{row}");
    assert!(row.contains(&herd.pid().to_string()), "{row}");

    let out = cli(&home, &["ls", "--json"]);
    out.assert_ok();
    let apps: Value = serde_json::from_str(&out.stdout).expect("ls --json is JSON");
    let apps = apps.as_array().expect("an array");
    assert_eq!(apps.len(), 1, "{out}");
    assert_eq!(apps[0]["name"], name);
    assert_eq!(apps[0]["ready"], 2);
    assert_eq!(apps[0]["pid"], herd.pid());

    // An empty HERD_HOME lists nothing.
    let empty = TempDir::new();
    let out = cli(&empty.join("home"), &["ls"]);
    out.assert_ok();
    assert!(out.stdout.contains("no apps running"), "{out}");
}

/// SIGKILLs `herd`'s supervisor and checks that every worker in `pids` dies by itself
/// (the parent-death signal herd sets in each worker), before any cleanup of the test's
/// harness could kill them.
fn workers_die_with_the_supervisor(supervisor: u32, pids: &std::collections::BTreeSet<u32>) {
    assert!(!pids.is_empty());
    // SAFETY: kill(2) on the supervisor pid this test started or learnt from herd status.
    let rc = unsafe { libc::kill(supervisor as i32, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill -9 herd");
    for &pid in pids {
        assert!(
            wait_dead(pid, crate::util::WAIT),
            "worker {pid} outlived its SIGKILLed supervisor"
        );
    }
}

#[test]
fn socket_activation_workers_die_when_herd_run_is_sigkilled() {
    let name = "ctl-kill9-sa";
    let herd = start_python(name, 2, &[]);
    herd.wait_ready();
    let home = home_of(&herd);
    let pids = all_pids(&wait_status(&home, name, "ready", |s| settled(s, 2)));
    // The harness's Drop would kill the workers too: this check runs before it.
    workers_die_with_the_supervisor(herd.pid(), &pids);
}

#[test]
fn node_workers_die_when_herd_run_is_sigkilled() {
    let name = "ctl-kill9-node";
    let herd = start_node(name, 2, &[]);
    herd.wait_ready();
    let home = home_of(&herd);
    let pids = all_pids(&wait_status(&home, name, "ready", |s| settled(s, 2)));
    workers_die_with_the_supervisor(herd.pid(), &pids);
}

#[test]
fn workers_of_a_detached_app_die_when_its_supervisor_is_sigkilled() {
    let dir = TempDir::new();
    let home = dir.join("home");
    let name = "ctl-kill9-start";
    let mut guard = Detached::new(&home, name);
    let app = fixture("control_server.py");
    cli(
        &home,
        &[
            "start",
            "-i",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--name",
            name,
            &app,
        ],
    )
    .assert_ok();
    let s = wait_status(&home, name, "ready", |s| settled(s, 2));
    guard.learn(&s);
    let supervisor = guard.supervisor().expect("supervisor pid");
    workers_die_with_the_supervisor(supervisor, &all_pids(&s));
}
