//! A Node worker that will not leave: it ignores herd's `disconnect` (a timer keeps it
//! alive) and SIGTERM. Once its disconnect finished (its IPC channel closed) herd sends
//! SIGTERM, and SIGKILL when `--kill-timeout` is up (one timeout in all, not two), on reload
//! and on stop; the reload succeeds, herd exits, nothing is left.
//! Fixture: `fixtures/tests15_app.js` with `STUBBORN=1`.

use serde_json::Value;

use crate::util::{cli, home_of, start_named_node, ts_ms, Herd};

/// `--kill-timeout 1s`.
const KILL_TIMEOUT_MS: i64 = 1000;
/// How late herd's SIGKILL may be, beyond `--kill-timeout`, on a loaded machine. (Before
/// issue #11 item 5 was fixed it came 2 s after a SIGTERM sent at the timeout: 3 s in all.)
const SLACK_MS: i64 = 1500;

/// Checks how worker `id` was made to leave, from `asked` (herd's `ts` of the moment it
/// asked the worker to disconnect) on: SIGTERM before the kill timeout, which it ignored,
/// then SIGKILL once the kill timeout is up, and its exit by SIGKILL.
fn escalated(herd: &Herd, from: usize, id: u64, asked: i64) {
    let what = |e: &Value, text: &str| {
        e["event"] == "kill"
            && e["worker_id"] == id
            && e["message"].as_str().is_some_and(|m| m.contains(text))
    };
    let term = herd.wait_event_after(&format!("SIGTERM for worker {id}"), from, |e| {
        what(e, "SIGTERM")
    });
    let kill = herd.wait_event_after(&format!("SIGKILL for worker {id}"), from, |e| {
        what(e, "SIGKILL")
    });
    let exited = herd.wait_event_after(&format!("worker {id}'s exit"), from, |e| {
        e["event"] == "exited" && e["worker_id"] == id
    });
    herd.wait_event_after(&format!("worker {id} ignoring SIGTERM"), from, |e| {
        e["worker_id"] == id && e["line"] == "ignoring SIGTERM"
    });
    herd.wait_event_after(
        &format!("worker {id} staying after disconnect"),
        from,
        |e| e["worker_id"] == id && e["line"] == "disconnected, staying",
    );
    let (to_term, to_kill) = (ts_ms(&term) - asked, ts_ms(&kill) - asked);
    eprintln!("worker {id}: SIGTERM {to_term} ms, SIGKILL {to_kill} ms after disconnect");
    assert!(
        (0..KILL_TIMEOUT_MS).contains(&to_term),
        "worker {id} got SIGTERM {to_term} ms after it was asked to leave (--kill-timeout 1s)\n{}",
        herd.dump()
    );
    assert!(
        (KILL_TIMEOUT_MS..KILL_TIMEOUT_MS + SLACK_MS).contains(&to_kill),
        "worker {id} got SIGKILL {to_kill} ms after it was asked to leave (--kill-timeout 1s)\n{}",
        herd.dump()
    );
    assert_eq!(exited["signal"], libc::SIGKILL, "{exited}");
    assert_eq!(exited["expected"], true, "{exited}");
    assert!(ts_ms(&exited) >= ts_ms(&kill), "{exited}");
}

#[test]
fn a_node_worker_ignoring_disconnect_and_sigterm_is_killed_on_reload_and_stop() {
    let name = "stubborn";
    let mut herd = start_named_node(
        "tests15_app.js",
        name,
        2,
        &["--kill-timeout", "1s", "-e", "STUBBORN=1"],
    );
    herd.wait_ready();
    let home = home_of(&herd);

    // Reload: each old worker is asked to leave once its successor is ready.
    let mark = herd.mark();
    let out = cli(&home, &["reload", name]);
    assert_eq!(out.code, Some(0), "{out}\n{}", herd.dump());
    let events = herd.events();
    let old: Vec<(u64, u64)> = events[..mark]
        .iter()
        .filter(|e| e["event"] == "ready")
        .map(|e| {
            (
                e["instance"].as_u64().expect("instance"),
                e["worker_id"].as_u64().expect("worker_id"),
            )
        })
        .collect();
    assert_eq!(old.len(), 2, "{}", herd.dump());
    for (instance, id) in old {
        let successor = herd.wait_event_after("the successor's ready", mark, |e| {
            e["event"] == "ready" && e["instance"] == instance && e["worker_id"] != id
        });
        escalated(&herd, mark, id, ts_ms(&successor));
    }

    // Stop: herd asks both to leave, and exits once SIGKILL got them.
    let mark = herd.mark();
    let current: Vec<u64> = herd.events()[..mark]
        .iter()
        .filter(|e| e["event"] == "ready")
        .filter_map(|e| e["worker_id"].as_u64())
        .rev()
        .take(2)
        .collect();
    let status = herd.stop();
    assert_eq!(status.code(), Some(0), "{}", herd.dump());
    let stopping = herd.wait_named_after("stopping", mark);
    for id in current {
        escalated(&herd, mark, id, ts_ms(&stopping));
    }
    herd.assert_no_worker_left();
}
