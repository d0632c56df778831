//! Messages between Node workers and herd over the cluster IPC channel.

use std::collections::BTreeSet;

use serde_json::json;

use super::start_node;
use crate::util::{get, pid_in};

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
    assert!(answered.is_subset(&workers), "{answered:?} vs {workers:?}");
    let exits = herd
        .events()
        .iter()
        .filter(|e| e["event"] == "exited")
        .count();
    assert_eq!(exits, 0, "no worker died\n{}", herd.dump());
}
