//! What a socket-activation worker inherits: the `sd_listen_fds` contract, herd's variables
//! and nothing else (no stray fds, no Node IPC).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use serde_json::Value;

use super::serving::concurrent_slow;
use super::start_inherit;
use crate::util::{fixture, poll_until};

/// The fds `python3 inherit.py --fds` has when started directly (not by herd), by target:
/// what the interpreter (or the environment running the tests) opens by itself.
fn baseline_fd_targets() -> Vec<String> {
    let out = Command::new("python3")
        .arg(fixture("inherit.py"))
        .arg("--fds")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run python3 inherit.py --fds");
    assert!(out.status.success(), "{out:?}");
    let fds: BTreeMap<String, String> =
        serde_json::from_slice(&out.stdout).expect("fd map from --fds");
    fds.into_values().collect()
}

#[test]
fn a_socket_activation_worker_inherits_exactly_its_listener_and_variables() {
    let herd = start_inherit(2, &["--name", "inh"]);
    herd.wait_ready();
    let port = herd.port();
    let bound = herd.wait_named("bound");
    assert_eq!(bound["address"], format!("127.0.0.1:{port}"), "{bound}");

    // One report from each worker.
    let mut reports: BTreeMap<u64, Value> = BTreeMap::new();
    poll_until("a report from both workers", || {
        for r in concurrent_slow(port, 2, 150) {
            let report = r.json();
            reports.insert(report["pid"].as_u64().expect("pid"), report);
        }
        (reports.len() == 2).then_some(())
    });
    let spawned = herd.events();
    let baseline = baseline_fd_targets();
    let mut instances = Vec::new();
    let mut listeners = std::collections::BTreeSet::new();
    for (pid, r) in &reports {
        let spawn = spawned
            .iter()
            .find(|e| e["event"] == "spawned" && e["pid"] == *pid)
            .unwrap_or_else(|| panic!("no spawned event for {pid}"));
        let instance = spawn["instance"].as_u64().expect("instance");
        instances.push(instance);

        // sd_listen_fds(3)
        assert_eq!(
            r["listen_pid"],
            pid.to_string(),
            "LISTEN_PID is the worker's own pid: {r}"
        );
        assert_eq!(r["listen_fds"], "1", "{r}");
        assert_eq!(r["listen_fdnames"], "http", "{r}");
        assert_eq!(r["family"], libc::AF_INET, "{r}");
        assert_eq!(r["sockname"], serde_json::json!(["127.0.0.1", port]), "{r}");
        assert_eq!(r["acceptconn"], true, "fd 3 is listening: {r}");
        assert_eq!(
            r["nonblock"], false,
            "fd 3 is blocking, as systemd passes it: {r}"
        );

        // herd's variables
        assert_eq!(r["herd_instance"], instance.to_string(), "{r}");
        assert_eq!(r["node_app_instance"], instance.to_string(), "{r}");
        assert_eq!(r["herd_worker_id"], spawn["worker_id"].to_string(), "{r}");
        assert_eq!(r["port"], port.to_string(), "{r}");
        assert_eq!(r["herd_app"], "inh", "{r}");
        assert_eq!(
            r["node_unique_id"], false,
            "no Node IPC for this worker: {r}"
        );
        assert_eq!(r["node_channel_fd"], false, "{r}");
        assert!(r["notify_socket"].is_string(), "a notify socket: {r}");

        // fds: 0 /dev/null, 1 and 2 herd's pipes, 3 the listener, nothing else from herd.
        let fds: BTreeMap<u32, String> = r["fds"]
            .as_object()
            .expect("fds")
            .iter()
            .map(|(k, v)| {
                (
                    k.parse().expect("fd number"),
                    v.as_str().expect("target").into(),
                )
            })
            .collect();
        eprintln!("worker {pid} fds: {fds:?}; without herd: {baseline:?}");
        listeners.insert(fds.get(&3).cloned());
        assert_eq!(
            fds.get(&0).map(String::as_str),
            Some("/dev/null"),
            "{fds:?}"
        );
        assert!(
            fds.get(&1).is_some_and(|t| t.starts_with("pipe:")),
            "{fds:?}"
        );
        assert!(
            fds.get(&2).is_some_and(|t| t.starts_with("pipe:")),
            "{fds:?}"
        );
        assert!(
            fds.get(&3).is_some_and(|t| t.starts_with("socket:")),
            "{fds:?}"
        );
        for (fd, target) in fds.range(4..) {
            let inherited_kind = ["socket:", "pipe:", "anon_inode:"]
                .iter()
                .any(|k| target.starts_with(k));
            assert!(
                !inherited_kind && baseline.contains(target),
                "fd {fd} → {target} is open in the worker but not in the same script run \
                 without herd (baseline targets {baseline:?}); all fds: {fds:?}"
            );
        }
    }
    instances.sort_unstable();
    for ready in spawned.iter().filter(|e| e["event"] == "ready") {
        assert_eq!(
            ready["via"], "notify",
            "READY=1 on NOTIFY_SOCKET reached herd: {ready}"
        );
    }
    assert_eq!(
        listeners.len(),
        1,
        "every worker's fd 3 is the one socket herd bound: {listeners:?}"
    );
    assert_eq!(instances, vec![0, 1]);
}
