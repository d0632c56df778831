//! Messages between Node workers and herd over the cluster IPC channel.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;

use super::start_node;
use crate::util::{get, pid_alive, pid_in, poll_until, wait_dead};

#[test]
fn process_send_reaches_herd_as_a_message_event() {
    let herd = start_node(2, &[]);
    herd.wait_ready();
    let port = herd.port();
    let r = get(port, "/hello").expect("request");
    assert_eq!(r.status, 200);
    let pid = pid_in(&r);
    let message = herd.wait_named("message");
    assert_eq!(message["pid"], pid, "{message}");
    assert_eq!(message["data"], json!({"hello": 1}), "{message}");
}

#[test]
fn a_broadcast_from_one_worker_reaches_the_others() {
    let herd = start_node(3, &[]);
    herd.wait_ready();
    let port = herd.port();
    let mark = herd.mark();
    let sender = pid_in(&get(port, "/broadcast").expect("request"));
    let broadcast = herd.wait_named_after("broadcast", mark);
    assert_eq!(broadcast["pid"], sender, "{broadcast}");
    let others: BTreeSet<u64> = herd
        .worker_pids()
        .into_iter()
        .filter(|&p| p != sender)
        .map(u64::from)
        .collect();
    assert_eq!(others.len(), 2);
    herd.wait_for("every other worker to log the broadcast", |events| {
        let got: BTreeSet<u64> = events[mark..]
            .iter()
            .filter(|e| e["line"] == r#"got message: {"x":1}"#)
            .filter_map(|e| e["pid"].as_u64())
            .collect();
        got == others
    });
}

#[test]
fn garbage_on_the_ipc_channel_is_logged_and_harms_no_one() {
    let herd = start_node(2, &[]);
    herd.wait_ready();
    let port = herd.port();
    let mark = herd.mark();
    let culprit = pid_in(&get(port, "/garbage").expect("request"));
    let error = herd.wait_named_after("ipc_error", mark);
    assert_eq!(error["pid"], culprit, "{error}");
    let message = error["message"].as_str().expect("message");
    assert!(
        message.contains("ignored") && !message.contains("killing"),
        "garbage is ignored, not a broken channel: {error}"
    );
    let mut answered = BTreeSet::new();
    for _ in 0..10 {
        let r = get(port, "/").expect("request after the garbage");
        assert_eq!(r.status, 200);
        answered.insert(pid_in(&r));
    }
    let workers: BTreeSet<u32> = herd.worker_pids().into_iter().collect();
    assert!(
        answered.iter().any(|p| *p != culprit),
        "the other worker keeps serving: {answered:?}"
    );
    assert!(
        answered.contains(&culprit),
        "the culprit itself keeps serving (round-robin over 2): {answered:?}"
    );
    assert!(answered.is_subset(&workers), "{answered:?} vs {workers:?}");
    let exits = herd
        .events()
        .iter()
        .filter(|e| e["event"] == "exited")
        .count();
    assert_eq!(exits, 0, "no worker died\n{}", herd.dump());
    assert_eq!(herd.worker_pids().len(), 2, "no worker was replaced");
    assert!(pid_alive(culprit), "the culprit is alive");
}

#[test]
fn a_line_over_the_ipc_limit_breaks_the_channel_and_the_worker_is_replaced() {
    let herd = start_node(2, &[]);
    herd.wait_ready();
    let port = herd.port();
    let mark = herd.mark();
    let culprit = pid_in(&get(port, "/hugeline").expect("request"));
    let error = herd.wait_named_after("ipc_error", mark);
    assert_eq!(error["pid"], culprit, "{error}");
    let message = error["message"].as_str().expect("message");
    assert!(
        message.contains("broken") && message.contains("killing"),
        "an over-long line breaks the channel: {error}"
    );
    let exited = herd.wait_event_after("the culprit's exit", mark, |e| {
        e["event"] == "exited" && e["pid"] == culprit
    });
    let instance = exited["instance"].clone();
    let spawned = herd.wait_event_after("its replacement", mark, |e| {
        e["event"] == "spawned" && e["instance"] == instance
    });
    let replacement = spawned["pid"].as_u64().expect("pid") as u32;
    assert_ne!(replacement, culprit);
    herd.wait_named_after("all_ready", mark);
    poll_until("the replacement answering", || {
        (pid_in(&get(port, "/").expect("request")) == replacement).then_some(())
    });
    assert!(
        wait_dead(culprit, Duration::from_secs(10)),
        "the culprit is gone"
    );
}
