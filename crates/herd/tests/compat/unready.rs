//! Worker-declared readiness: a ready Node worker leaves the rotation with
//! `process.send({herd: 'unready', reason})` and comes back with `{herd: 'ready'}`, without
//! being replaced. Fixture: `fixtures/compat_unready.js`.

use std::collections::BTreeSet;

use crate::util::{get, home_of, pid_alive, pid_in, start_named_node, status, workers, TempDir};

fn leaves_and_rejoins(name: &str, balance: &str) {
    let dir = TempDir::new();
    let ready_file = dir.join("ready");
    let herd = start_named_node(
        "compat_unready.js",
        name,
        2,
        &[
            "--balance",
            balance,
            "-e",
            &format!("READY_FILE={}", ready_file.display()),
        ],
    );
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);

    let mark = herd.mark();
    let r = get(port, "/unready?reason=db%20down").expect("request");
    let quitter = pid_in(&r);
    herd.wait_event_after("the unready event", mark, |e| {
        e["event"] == "unready" && e["pid"] == quitter && e["reason"] == "db down"
    });
    let s = status(&home, name);
    assert_eq!(
        s["ready"], 1,
        "an unready worker does not count as ready: {s:#}"
    );
    let shown = workers(&s)
        .iter()
        .find(|w| w["pid"] == quitter)
        .unwrap_or_else(|| panic!("the unready worker is still in its slot: {s:#}"));
    assert_eq!(shown["state"], "unready", "{s:#}");
    assert_eq!(shown["status_text"], "db down", "{s:#}");

    let served: BTreeSet<u32> = (0..30)
        .map(|_| pid_in(&get(port, "/").expect("request")))
        .collect();
    assert!(
        !served.contains(&quitter) && served.len() == 1,
        "an unready worker gets no connection: {served:?} (it is {quitter})\n{}",
        herd.dump()
    );
    assert!(pid_alive(quitter), "not replaced for being unready");
    assert!(
        !herd.events()[mark..]
            .iter()
            .any(|e| e["event"] == "spawned" || e["event"] == "exited"),
        "nothing is replaced\n{}",
        herd.dump()
    );

    // It comes back: counted and routed again.
    let mark = herd.mark();
    std::fs::write(&ready_file, b"").expect("create the ready file");
    herd.wait_event_after("the worker's ready again", mark, |e| {
        e["event"] == "ready" && e["pid"] == quitter
    });
    assert_eq!(status(&home, name)["ready"], 2);
    let back = (0..200).any(|_| pid_in(&get(port, "/").expect("request")) == quitter);
    assert!(back, "the worker gets connections again\n{}", herd.dump());
}

#[test]
fn a_round_robin_worker_leaves_and_rejoins_the_rotation_on_its_own_word() {
    leaves_and_rejoins("compat-unready-rr", "round-robin");
}

#[test]
fn a_hash_slot_leaves_and_rejoins_the_live_set_on_its_workers_word() {
    leaves_and_rejoins("compat-unready-hash", "hash");
}
