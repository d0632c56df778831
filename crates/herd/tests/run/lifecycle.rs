//! Crash loops, graceful stop and the forced stop of socket-activation workers.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::start_inherit;
use crate::util::{
    cli, fixture, get, home_of, pid_alive, pid_in, ready_pids,
    sigterm_with_a_slow_request_in_flight, ts_ms, wait_status, workers, Herd, TempDir,
};

#[test]
fn a_crash_loop_errors_every_slot_and_exits_non_zero_with_the_exit_code() {
    let app = fixture("exit3.sh");
    let mut herd = Herd::start(&[
        "-i",
        "2",
        "--restart-delay",
        "10ms",
        "--max-restarts",
        "3",
        &app,
    ]);
    let started = Instant::now();
    let status = herd.expect_exit();
    eprintln!("crash loop: herd exited after {:?}", started.elapsed());
    assert_eq!(status.code(), Some(1), "{}", herd.dump());
    let events = herd.events();
    for instance in 0..2u64 {
        let errored = events
            .iter()
            .find(|e| e["event"] == "errored" && e["instance"] == instance)
            .unwrap_or_else(|| panic!("no errored event for slot {instance}\n{}", herd.dump()));
        let message = errored["message"].as_str().expect("message");
        assert!(message.contains("code 3"), "{errored}");
        let reason = errored["reason"].as_str().expect("reason");
        assert!(reason.contains("code 3"), "{errored}");
        assert!(
            reason.contains("failing on purpose"),
            "the last output explains it: {errored}"
        );
    }
    // No worker was ever ready: each slot gives up after 2 restarts, not --max-restarts 3
    // (compat::startup checks that the full count applies once the app has served).
    let restarts = events.iter().filter(|e| e["event"] == "restarting").count();
    assert_eq!(
        restarts,
        2 * 2,
        "2 restarts per slot while nothing was ready, then it gives up\n{}",
        herd.dump()
    );
    herd.assert_no_worker_left();
}

#[test]
fn sigterm_lets_the_request_in_flight_finish() {
    let mut herd = start_inherit(2, &[]);
    sigterm_with_a_slow_request_in_flight(&mut herd);
    assert!(herd.not_json().is_empty(), "{:?}", herd.not_json());
    assert!(
        herd.stderr().is_empty(),
        "nothing on herd's stderr: {}",
        herd.stderr()
    );
    let exited: Vec<_> = herd
        .events()
        .into_iter()
        .filter(|e| e["event"] == "exited")
        .collect();
    assert_eq!(exited.len(), 2, "{exited:?}");
    for e in exited {
        assert_eq!(e["expected"], true, "{e}");
        assert_eq!(e["code"], 0, "{e}");
    }
}

#[test]
fn a_second_sigint_kills_workers_that_ignore_sigterm_at_once() {
    let mut herd = start_inherit(2, &["--kill-timeout", "60s", "-e", "IGNORE_TERM=1"]);
    herd.wait_ready();
    let mark = herd.mark();
    herd.signal(libc::SIGINT);
    herd.wait_named_after("stopping", mark);
    // The workers ignore SIGTERM and the grace period is a minute: herd is still waiting.
    assert!(
        herd.wait_exit(Duration::from_millis(500)).is_none(),
        "{}",
        herd.dump()
    );
    for pid in herd.worker_pids() {
        assert!(pid_alive(pid), "worker {pid} should still be running");
    }
    let second = Instant::now();
    herd.signal(libc::SIGINT);
    let status = herd.expect_exit();
    let took = second.elapsed();
    eprintln!("second SIGINT → herd exited ({status}) after {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "took {took:?}\n{}",
        herd.dump()
    );
    herd.assert_no_worker_left();
    let killed = herd
        .events()
        .into_iter()
        .filter(|e| e["event"] == "exited" && e["signal"] == libc::SIGKILL)
        .count();
    assert_eq!(killed, 2, "{}", herd.dump());
}

#[test]
fn crash_restarts_wait_growing_delays_that_reset_after_min_uptime() {
    // Start 1 lives 3.5 s (ready after 1 s up, so the app has served and the full
    // --max-restarts applies; past --min-uptime 3s: 300 ms), starts 2-4 die at once (450,
    // 675, 1012 ms), start 5 lives 3.5 s (the backoff resets: 300 ms), start 6 dies at once
    // (450 ms again).
    // --min-uptime is generous so that a quick crash stays under it on a loaded machine.
    // The gaps are read from the `exited` and next `spawned` events' timestamps: what herd
    // did, not what it says it will do.
    let dir = TempDir::new();
    let counter = dir.join("counter");
    let app = fixture("crashloop.sh");
    let mut herd = Herd::start(&[
        "-i",
        "1",
        "--restart-delay",
        "300ms",
        "--min-uptime",
        "3s",
        "--max-restarts",
        "50",
        "-e",
        &format!("COUNTER={}", counter.display()),
        "-e",
        "STABLE_AT=1 5",
        "-e",
        "STABLE_S=3.5",
        &app,
    ]);
    herd.wait_for("7 starts", |events| {
        events.iter().filter(|e| e["event"] == "spawned").count() >= 7
    });
    herd.stop();
    let events = herd.events();
    let spawned: Vec<&Value> = events.iter().filter(|e| e["event"] == "spawned").collect();
    let exited: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "exited" && e["expected"] == false)
        .collect();
    let said: Vec<u64> = events
        .iter()
        .filter(|e| e["event"] == "restarting")
        .filter_map(|e| e["delay_ms"].as_u64())
        .take(6)
        .collect();
    assert_eq!(
        said,
        [300, 450, 675, 1012, 300, 450],
        "announced delays\n{}",
        herd.dump()
    );
    let gaps: Vec<i64> = (0..6)
        .map(|k| {
            assert_eq!(exited[k]["pid"], spawned[k]["pid"], "{}", herd.dump());
            ts_ms(spawned[k + 1]) - ts_ms(exited[k])
        })
        .collect();
    let uptime = ts_ms(exited[4]) - ts_ms(spawned[4]);
    eprintln!("restart gaps {gaps:?} ms; start 5 was up {uptime} ms");
    assert!(uptime >= 3000, "start 5 outlived --min-uptime: {uptime} ms");
    // Timestamps have millisecond resolution: allow 2 ms of rounding below each delay.
    for (k, (&gap, &delay)) in gaps.iter().zip(&said).enumerate() {
        assert!(
            gap >= delay as i64 - 2,
            "restart {k} came {gap} ms after the exit, before its {delay} ms delay: {gaps:?}"
        );
    }
    // Without the reset the 5th delay would be 1518 ms; the generous bound leaves 700 ms
    // for a loaded machine.
    assert!(
        gaps[4] < 1000,
        "the backoff did not reset after a run past --min-uptime: {gaps:?}"
    );
}

#[test]
fn workers_that_ignore_sigterm_are_killed_after_kill_timeout_on_scale_reload_and_stop() {
    let name = "ignore-term";
    let mut herd = start_inherit(
        3,
        &[
            "--name",
            name,
            "--kill-timeout",
            "1s",
            "-e",
            "IGNORE_TERM=1",
        ],
    );
    herd.wait_ready();
    let home = home_of(&herd);
    let killed_after = |herd: &Herd, mark: usize, n: usize, what: &str| {
        let events = herd.events();
        let killed: Vec<&Value> = events[mark..]
            .iter()
            .filter(|e| e["event"] == "exited")
            .collect();
        assert_eq!(killed.len(), n, "{what}: {n} exits\n{}", herd.dump());
        for e in killed {
            assert_eq!(e["signal"], libc::SIGKILL, "{what}: SIGKILLed: {e}");
            assert_eq!(e["expected"], true, "{what}: {e}");
        }
    };

    // Scale down: the worker that is let go ignores SIGTERM and is SIGKILLed.
    let mark = herd.mark();
    cli(&home, &["scale", name, "2"]).assert_ok();
    herd.wait_event_after("the scaled-down worker's exit", mark, |e| {
        e["event"] == "exited"
    });
    killed_after(&herd, mark, 1, "scale 3 → 2");

    // Reload: both old workers are SIGKILLed after the grace; the reload succeeds.
    let mark = herd.mark();
    let out = cli(&home, &["reload", name]);
    assert_eq!(out.code, Some(0), "{out}\n{}", herd.dump());
    herd.wait_for("both old workers' exits", |events| {
        events[mark..]
            .iter()
            .filter(|e| e["event"] == "exited")
            .count()
            >= 2
    });
    killed_after(&herd, mark, 2, "reload");

    // Stop: herd waits the grace, SIGKILLs both, and exits.
    let mark = herd.mark();
    let stopped = Instant::now();
    herd.signal(libc::SIGTERM);
    herd.expect_exit();
    let took = stopped.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "herd waited --kill-timeout before SIGKILL: {took:?}"
    );
    killed_after(&herd, mark, 2, "stop");
    herd.assert_no_worker_left();
}

#[test]
fn no_autorestart_leaves_a_dead_slot_errored_while_the_others_serve() {
    let name = "no-restart";
    let herd = start_inherit(2, &["--name", name, "--no-autorestart"]);
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);
    let pids = herd.worker_pids();
    let (victim, survivor) = (pids[0], pids[1]);
    let mark = herd.mark();
    crate::util::kill(victim, libc::SIGKILL);
    let exited = herd.wait_event_after("the victim's exit", mark, |e| {
        e["event"] == "exited" && e["pid"] == victim
    });
    assert!(
        exited["message"]
            .as_str()
            .is_some_and(|m| m.contains("not restarting")),
        "{exited}"
    );
    let s = wait_status(&home, name, "one slot errored", |s| {
        workers(s).iter().any(|w| w["state"] == "errored")
    });
    assert_eq!(s["state"], "running", "the app still runs: {s:#}");
    assert_eq!(s["ready"], 1, "{s:#}");
    assert_eq!(
        ready_pids(&s).into_iter().collect::<Vec<_>>(),
        [survivor],
        "{s:#}"
    );
    for _ in 0..5 {
        let r = get(port, "/").expect("the surviving worker serves");
        assert_eq!(pid_in(&r), survivor);
    }
    assert!(
        !herd.events()[mark..]
            .iter()
            .any(|e| e["event"] == "spawned" || e["event"] == "restarting"),
        "nothing restarted\n{}",
        herd.dump()
    );
}
