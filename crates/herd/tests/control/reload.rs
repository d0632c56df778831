//! `herd reload`: rolling, zero-downtime replacement, the bad release that keeps the old
//! workers, and the second reload that is refused.

use std::time::Instant;

use super::support::{
    cli, home_of, ready_pids, settled, spawn_cli, start_node, start_python, status, wait_status,
    workers, Load,
};
use crate::util::{fixture, pid_alive, wait_dead, Herd, TempDir, WAIT};

const INSTANCES: usize = 2;
const RELOADS: usize = 5;
/// Requests per mode, at least; the clients keep going until every reload is done.
const REQUESTS: usize = 2_000;
/// Four clients; one asks for a 50 ms answer, so requests are in flight whenever an old
/// worker is told to stop.
const CLIENTS: [&str; 4] = ["/", "/", "/", "/slow?ms=50"];

/// Five `herd reload NAME` in a row while 4 clients keep the port busy: every reload exits 0,
/// each replaces every worker (the pids after it are disjoint from those before), and no
/// request fails.
fn reloads_under_load(herd: &Herd, name: &str) {
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(herd);
    let first = wait_status(&home, name, "every worker ready", |s| settled(s, INSTANCES));
    let mut pids = ready_pids(&first);
    let started = Instant::now();
    let load = Load::start(port, &CLIENTS);
    load.wait_for(50);
    let before = load.done();
    for round in 1..=RELOADS {
        let out = cli(&home, &["reload", name]);
        assert_eq!(out.code, Some(0), "reload {round}\n{out}\n{}", herd.dump());
        assert!(out.stdout.contains("reloaded"), "reload {round}\n{out}");
        let s = status(&home, name);
        assert!(
            settled(&s, INSTANCES),
            "after reload {round} every slot runs one ready worker: {s:#}"
        );
        let now = ready_pids(&s);
        assert!(
            now.is_disjoint(&pids),
            "reload {round} replaced every worker: before {pids:?}, after {now:?}"
        );
        for old in &pids {
            assert!(
                !pid_alive(*old),
                "reload {round}: old worker {old} still runs"
            );
        }
        pids = now;
    }
    let during = load.done() - before;
    let report = load.finish(REQUESTS);
    eprintln!(
        "{name}: {} requests ({during} during {RELOADS} reloads), {} failed, {} worker pids answered, {:?} in all",
        report.ok + report.failed,
        report.failed,
        report.pids.len(),
        started.elapsed()
    );
    report.assert_clean(&format!("{RELOADS} reloads of {name}"));
    assert!(
        during >= 100,
        "the clients were busy while the reloads ran ({during} requests)"
    );
    assert!(
        report.pids.len() > INSTANCES,
        "old and new workers answered: {:?}",
        report.pids
    );
    let exited = herd
        .events()
        .iter()
        .filter(|e| e["event"] == "exited" && e["expected"] == false)
        .count();
    assert_eq!(exited, 0, "no worker crashed\n{}", herd.dump());
}

#[test]
fn reload_node_round_robin_drops_no_request() {
    let herd = start_node("ctl-rr", INSTANCES, &[]);
    reloads_under_load(&herd, "ctl-rr");
}

#[test]
fn reload_node_shared_drops_no_request() {
    let herd = start_node("ctl-shared", INSTANCES, &["--balance", "shared"]);
    reloads_under_load(&herd, "ctl-shared");
}

/// The Python worker sends READY=1 once it accepts, and finishes the request in hand on
/// SIGTERM: what a socket-activation worker must do for a zero-downtime reload. `--ready
/// notify`: only READY=1 counts (the default also takes "up 1 s", which a slow start on a
/// busy machine reaches first).
#[test]
fn reload_socket_activation_drops_no_request() {
    let herd = start_python("ctl-sa", INSTANCES, &["--ready", "notify"]);
    reloads_under_load(&herd, "ctl-sa");
    let via_notify = herd
        .events()
        .iter()
        .filter(|e| e["event"] == "ready" && e["via"] == "notify")
        .count();
    assert_eq!(
        via_notify,
        INSTANCES * (RELOADS + 1),
        "every worker was ready by READY=1\n{}",
        herd.dump()
    );
}

#[test]
fn a_bad_release_keeps_the_old_workers_serving() {
    let dir = TempDir::new();
    let app = dir.join("app.js");
    std::fs::copy(fixture("control_app.js"), &app).expect("copy the app");
    let app = app.to_string_lossy().into_owned();
    let name = "ctl-bad";
    let herd = Herd::start(&["-i", "2", "-e", "PORT=0", "--name", name, &app]);
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);
    let old = ready_pids(&wait_status(&home, name, "every worker ready", |s| {
        settled(s, 2)
    }));

    let load = Load::start(port, &CLIENTS);
    load.wait_for(50);
    std::fs::write(
        &app,
        "console.error('bad release starting');\nthrow new Error('bad release: boom-4711');\n",
    )
    .expect("write the bad release");
    let out = cli(&home, &["reload", name]);
    let report = load.finish(1_000);

    assert_eq!(out.code, Some(1), "{out}\n{}", herd.dump());
    assert!(out.stdout.is_empty(), "{out}");
    assert!(out.stderr.starts_with("error: "), "{out}");
    assert!(out.stderr.contains("failed"), "{out}");
    assert!(out.stderr.contains("code 1"), "names the exit code\n{out}");
    assert!(
        out.stderr.contains("bad release: boom-4711"),
        "names the thrown error (the worker's last output)\n{out}"
    );
    assert!(
        out.stderr
            .contains("0 workers run the new version, 2 workers keep running the previous version"),
        "{out}"
    );

    report.assert_clean("a client during the failed reload");
    assert!(
        report.pids.is_subset(&old),
        "only the old workers answered: {:?} vs {old:?}",
        report.pids
    );
    let s = status(&home, name);
    assert!(settled(&s, 2), "{s:#}");
    assert_eq!(ready_pids(&s), old, "the old workers still serve: {s:#}");
}

/// The usual bad release throws from deeper down than the entry file: a module it requires.
/// Node then prints the error line, ten stack frames, a blank line and its version: the
/// error line must still be in what `herd reload` reports.
#[test]
fn a_bad_release_names_the_error_of_a_broken_dependency() {
    let dir = TempDir::new();
    let app = dir.join("app.js");
    std::fs::copy(fixture("control_app.js"), &app).expect("copy the app");
    let app = app.to_string_lossy().into_owned();
    let name = "ctl-bad-dep";
    let herd = Herd::start(&["-i", "1", "-e", "PORT=0", "--name", name, &app]);
    herd.wait_ready();
    let home = home_of(&herd);
    let old = ready_pids(&wait_status(&home, name, "ready", |s| settled(s, 1)));
    std::fs::write(
        dir.join("dep.js"),
        "throw new Error('broken dependency: dep-1234');\n",
    )
    .expect("write dep.js");
    std::fs::write(&app, "require('./dep');\n").expect("write the bad release");
    let out = cli(&home, &["reload", name]);
    assert_eq!(out.code, Some(1), "{out}");
    assert_eq!(ready_pids(&status(&home, name)), old);
    assert!(
        out.stderr.contains("broken dependency: dep-1234"),
        "the reload error names the thrown error\n{out}"
    );
}

#[test]
fn a_second_reload_is_refused_while_one_runs() {
    let name = "ctl-busy";
    // The replacement starts while the block file exists, so it waits (not listening, not
    // ready) until the test removes it: the reload runs for as long as the test needs.
    let dir = TempDir::new();
    let block = dir.join("block");
    let herd = start_node(name, 1, &["-e", &format!("BLOCK_FILE={}", block.display())]);
    herd.wait_ready();
    let home = home_of(&herd);
    let before = ready_pids(&wait_status(&home, name, "ready", |s| settled(s, 1)));
    std::fs::write(&block, b"").expect("create the block file");
    let mark = herd.mark();
    let first = spawn_cli(&home, &["reload", name]);
    herd.wait_named_after("reloading", mark);
    herd.wait_line_after(mark, "blocked");

    let second = cli(&home, &["reload", name]);
    assert_ne!(second.code, Some(0), "{second}");
    assert!(second.stderr.contains("already in progress"), "{second}");
    let scale = cli(&home, &["scale", name, "+1"]);
    assert_ne!(scale.code, Some(0), "{scale}");
    assert!(scale.stderr.contains("already in progress"), "{scale}");
    let restart = cli(&home, &["restart", name]);
    assert_ne!(restart.code, Some(0), "{restart}");
    assert!(restart.stderr.contains("already in progress"), "{restart}");
    let s = status(&home, name);
    assert_eq!(s["state"], "reloading", "{s:#}");
    assert_eq!(
        workers(&s).len(),
        2,
        "the old worker and its replacement: {s:#}"
    );

    std::fs::remove_file(&block).expect("remove the block file");
    let first = first.finish(WAIT);
    assert_eq!(first.code, Some(0), "{first}\n{}", herd.dump());
    let s = status(&home, name);
    assert!(settled(&s, 1), "{s:#}");
    assert!(ready_pids(&s).is_disjoint(&before), "{s:#}");
}

#[test]
fn reload_parallel_replaces_two_slots_at_a_time() {
    let name = "ctl-parallel";
    let herd = start_node(name, 3, &[]);
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);
    let before = ready_pids(&wait_status(&home, name, "every worker ready", |s| {
        settled(s, 3)
    }));
    let load = Load::start(port, &CLIENTS);
    load.wait_for(50);
    let mark = herd.mark();
    let out = cli(&home, &["reload", name, "--parallel", "2"]);
    assert_eq!(out.code, Some(0), "{out}\n{}", herd.dump());
    let report = load.finish(500);
    report.assert_clean("reload --parallel 2");
    let s = status(&home, name);
    assert!(settled(&s, 3), "{s:#}");
    assert!(ready_pids(&s).is_disjoint(&before), "{s:#}");
    // Two replacements started before the first of them was ready.
    let events = herd.events();
    let order: Vec<&str> = events[mark..]
        .iter()
        .filter_map(|e| match e["event"].as_str() {
            Some("spawned") => Some("spawned"),
            Some("ready") => Some("ready"),
            _ => None,
        })
        .collect();
    assert_eq!(
        order.get(..2),
        Some(&["spawned", "spawned"][..]),
        "{order:?}\n{}",
        herd.dump()
    );
}

#[test]
fn a_reload_whose_new_worker_never_gets_ready_keeps_the_old_workers() {
    // The new worker starts but never listens (it waits on the block file): after
    // --listen-timeout herd must stop it, keep the old workers and fail the reload.
    let name = "ctl-hang-reload";
    let dir = TempDir::new();
    let block = dir.join("block");
    let herd = start_node(
        name,
        2,
        &[
            "--listen-timeout",
            "2s",
            "-e",
            &format!("BLOCK_FILE={}", block.display()),
        ],
    );
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);
    let old = ready_pids(&wait_status(&home, name, "ready", |s| settled(s, 2)));
    let load = Load::start(port, &CLIENTS);
    load.wait_for(50);
    std::fs::write(&block, b"").expect("create the block file");
    let mark = herd.mark();
    let out = cli(&home, &["reload", name]);
    let report = load.finish(200);
    assert_eq!(out.code, Some(1), "{out}\n{}", herd.dump());
    assert!(out.stderr.starts_with("error: "), "{out}");
    assert!(
        out.stderr
            .contains("0 workers run the new version, 2 workers keep running the previous version"),
        "{out}"
    );
    let hung: Vec<u32> = herd.events()[mark..]
        .iter()
        .filter(|e| e["event"] == "spawned")
        .filter_map(|e| e["pid"].as_u64())
        .map(|p| p as u32)
        .collect();
    assert!(
        !hung.is_empty(),
        "a new worker was started\n{}",
        herd.dump()
    );
    for &pid in &hung {
        assert!(
            wait_dead(pid, WAIT),
            "the never-ready worker {pid} was stopped"
        );
    }
    report.assert_clean("a client during the reload that timed out");
    assert!(report.pids.is_subset(&old), "{:?} vs {old:?}", report.pids);
    let s = wait_status(&home, name, "settled on the old workers", |s| settled(s, 2));
    assert_eq!(ready_pids(&s), old, "the old workers still serve: {s:#}");
}

#[test]
fn a_reload_that_fails_in_its_second_slot_reports_it_and_keeps_serving() {
    // Slot 0's new worker is fine, slot 1's throws at start: herd reload exits 1 naming
    // the error, slot 1 keeps its old worker, and every slot still serves.
    let name = "ctl-partial";
    let dir = TempDir::new();
    let herd = start_node(
        name,
        2,
        &["-e", &format!("BAD_DIR={}", dir.path().display())],
    );
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);
    let before = wait_status(&home, name, "ready", |s| settled(s, 2));
    let old_of = |s: &serde_json::Value, instance: u64| -> u32 {
        workers(s)
            .iter()
            .find(|w| w["instance"] == instance && w["state"] == "ready")
            .and_then(|w| w["pid"].as_u64())
            .unwrap_or_else(|| panic!("no ready worker in slot {instance}: {s:#}")) as u32
    };
    let (old0, old1) = (old_of(&before, 0), old_of(&before, 1));
    let load = Load::start(port, &CLIENTS);
    load.wait_for(50);
    std::fs::write(dir.join("bad-1"), b"").expect("break slot 1");
    let out = cli(&home, &["reload", name]);
    let report = load.finish(200);
    assert_eq!(out.code, Some(1), "{out}\n{}", herd.dump());
    assert!(
        out.stderr.contains("bad in slot 1"),
        "names the error\n{out}"
    );
    assert!(
        out.stderr.contains("after replacing 1 of 2 workers"),
        "says how far it got\n{out}"
    );
    // Slot 0 already runs the new version: the error must not say both run the old one.
    assert!(
        out.stderr
            .contains("1 worker runs the new version, 1 worker keeps running the previous version"),
        "says truthfully what runs which version\n{out}"
    );
    report.assert_clean("a client during the reload that failed in slot 1");
    let s = wait_status(&home, name, "settled after the failed reload", |s| {
        settled(s, 2)
    });
    // No rollback: slot 0 runs the new version, slot 1 the old one (what the error says).
    assert_ne!(old_of(&s, 0), old0, "slot 0 was replaced: {s:#}");
    assert_eq!(old_of(&s, 1), old1, "slot 1 keeps its old worker: {s:#}");
    assert_eq!(s["state"], "running", "{s:#}");
    std::fs::remove_file(dir.join("bad-1")).expect("fix slot 1");
    let again = cli(&home, &["reload", name]);
    again.assert_ok();
    let s = wait_status(&home, name, "settled after the good reload", |s| {
        settled(s, 2)
    });
    assert_ne!(
        old_of(&s, 1),
        old1,
        "a later good reload replaces slot 1: {s:#}"
    );
}
