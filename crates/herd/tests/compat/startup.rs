//! Giving up on an app that fails at start: while no worker has been ready since herd
//! started, a slot errors after 3 unstable runs (not `--max-restarts`), and with every slot
//! errored `herd run` exits 1 (as `herd start` fails), so an orchestrator sees it. Once the
//! app has served, `--max-restarts` keeps its full meaning.

use std::time::{Duration, Instant};

use crate::util::{fixture, Herd, TempDir};

#[test]
fn a_script_that_throws_at_start_makes_herd_run_exit_non_zero_within_seconds() {
    let app = fixture("compat_throw.js");
    let started = Instant::now();
    let mut herd = Herd::start(&["-i", "2", &app]);
    let status = herd
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("herd run still retrying after 20 s\n{}", herd.dump()));
    let took = started.elapsed();
    eprintln!("crash at start: herd run exited after {took:?}");
    assert_eq!(status.code(), Some(1), "{}", herd.dump());
    let events = herd.events();
    for instance in 0..2u64 {
        let traces = events
            .iter()
            .filter(|e| e["instance"] == instance)
            .filter(|e| {
                e["line"]
                    .as_str()
                    .is_some_and(|l| l.starts_with("Error: compat_throw"))
            })
            .count();
        assert!(
            (1..=3).contains(&traces),
            "slot {instance}: {traces} stack traces, at most 3\n{}",
            herd.dump()
        );
        assert!(
            events.iter().any(|e| e["event"] == "errored"
                && e["instance"] == instance
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("no worker has been ready yet"))),
            "slot {instance} errored, saying why\n{}",
            herd.dump()
        );
    }
    assert!(
        events.iter().any(|e| e["event"] == "errored"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("before any worker was ready"))),
        "herd says why it exits\n{}",
        herd.dump()
    );
    herd.assert_no_worker_left();
}

#[test]
fn max_restarts_keeps_its_full_count_once_the_app_has_served() {
    // Start 1 is ready (1 s up) and lives past --min-uptime; every later start dies at once.
    // --max-restarts 3 then allows 3 unstable restarts: starts 2, 3, 4 and 5 run, 5's exit
    // errors the slot (with the start-up limit it would be 4's).
    let dir = TempDir::new();
    let counter = dir.join("counter");
    let app = fixture("crashloop.sh");
    let mut herd = Herd::start(&[
        "-i",
        "1",
        "--restart-delay",
        "10ms",
        "--min-uptime",
        "1500ms",
        "--max-restarts",
        "3",
        "-e",
        &format!("COUNTER={}", counter.display()),
        "-e",
        "STABLE_AT=1",
        "-e",
        "STABLE_S=2",
        &app,
    ]);
    let status = herd.expect_exit();
    assert_eq!(status.code(), Some(1), "{}", herd.dump());
    let events = herd.events();
    assert!(
        events.iter().any(|e| e["event"] == "ready"),
        "start 1 was ready\n{}",
        herd.dump()
    );
    let spawned = events.iter().filter(|e| e["event"] == "spawned").count();
    assert_eq!(spawned, 5, "1 stable start + 4 quick ones\n{}", herd.dump());
    herd.assert_no_worker_left();
}
