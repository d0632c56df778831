//! `herd restart NAME --instance N`: that slot's worker is replaced gracefully (the new one
//! is ready before the old one is told to stop), the other slots are untouched, and a new
//! worker that never gets ready leaves the old one serving.

use super::{pids_by_instance, settled_pids, start_node};
use crate::util::{cli, home_of, pid_alive, status, wait_dead, TempDir, WAIT};

#[test]
fn restart_instance_replaces_only_that_worker_and_stops_it_after_its_successor_is_ready() {
    let name = "monit-restart1";
    let herd = start_node(name, 2, &[]);
    herd.wait_ready();
    let home = home_of(&herd);
    let before = settled_pids(&home, name, 2);
    let mark = herd.mark();
    let out = cli(&home, &["restart", name, "--instance", "1"]);
    out.assert_ok();
    assert!(
        out.stdout.contains(&format!("restarted {name}[1]")),
        "{out}"
    );
    let after = settled_pids(&home, name, 2);
    assert_eq!(after[0], before[0], "instance 0 kept its worker");
    assert_ne!(after[1], before[1], "instance 1 has a new worker");
    assert!(
        out.stdout.contains(&format!("pid {}", after[1])),
        "the answer names the new pid: {out}"
    );
    assert!(wait_dead(before[1], WAIT), "the old worker is gone");
    assert!(pid_alive(before[0]));
    // Graceful: the successor was ready before the old worker was stopped.
    let events = herd.events();
    let at = |event: &str, pid: u32| {
        events[mark..]
            .iter()
            .position(|e| e["event"] == event && e["pid"] == pid)
            .unwrap_or_else(|| panic!("no {event} of {pid}\n{}", herd.dump()))
    };
    assert!(
        at("ready", after[1]) < at("exited", before[1]),
        "the new worker was ready before the old one exited\n{}",
        herd.dump()
    );
    let s = status(&home, name);
    assert_eq!(s["workers"][1]["restarts_by_reason"]["reload"], 1, "{s:#}");

    // A slot that does not exist is refused, naming the instances there are.
    let out = cli(&home, &["restart", name, "--instance", "2"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("no instance 2") && out.stderr.contains("0 to 1"),
        "{out}"
    );
    assert_eq!(pids_by_instance(&status(&home, name)), after);
}

#[test]
fn restart_instance_keeps_the_old_worker_when_the_new_one_never_gets_ready() {
    let name = "monit-restart-hang";
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
    let home = home_of(&herd);
    let before = settled_pids(&home, name, 2);
    // From now on a new worker never listens.
    std::fs::write(&block, b"").expect("create the block file");
    let out = cli(&home, &["restart", name, "--instance", "0"]);
    assert_eq!(out.code, Some(1), "{out}\n{}", herd.dump());
    assert!(
        out.stderr.contains(&format!("restarting {name}[0] failed"))
            && out.stderr.contains("keeps running"),
        "{out}"
    );
    assert_eq!(
        settled_pids(&home, name, 2),
        before,
        "both old workers serve"
    );
}
