//! `--group` and the supplementary groups of `--user`, as the worker sees them.

use crate::util::system::is_root;
use crate::util::{prerequisite_missing, run_to_end, Herd};

fn ids(pid: u32, field: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .map(|n| n.parse().expect("an id"))
        .collect()
}

/// One worker (`sleep`) run with `flags`; returns (uids, gids, groups) of the worker.
fn worker_ids(name: &str, flags: &[&str]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut args = vec!["-i", "1", "--name", name, "--ready", "delay:20ms"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["sleep", "600"]);
    let mut herd = Herd::start(&args);
    herd.wait_ready();
    let pid = herd.worker_pids()[0];
    let found = (ids(pid, "Uid:"), ids(pid, "Gid:"), ids(pid, "Groups:"));
    assert_eq!(herd.stop().code(), Some(0));
    found
}

/// A user listed as a member of some group in /etc/group, with those groups' ids.
fn a_member() -> Option<(String, Vec<u32>)> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    let mut by_user: std::collections::BTreeMap<String, Vec<u32>> = Default::default();
    for line in groups.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() == 4 {
            for m in f[3].split(',').filter(|m| !m.is_empty()) {
                if let Ok(gid) = f[2].parse() {
                    by_user.entry(m.to_string()).or_default().push(gid);
                }
            }
        }
    }
    by_user.into_iter().find(|(u, _)| {
        std::process::Command::new("id")
            .arg(u)
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[test]
fn group_and_supplementary_groups_reach_the_worker() {
    if !is_root() {
        prerequisite_missing("root, to run workers as nobody");
        return;
    }
    // --user alone: nobody's primary group, and only its own groups (not root's).
    let (uids, gids, groups) = worker_ids("sys-user", &["--user", "nobody"]);
    assert_eq!(uids, [65534; 4]);
    assert_eq!(gids, [65534; 4]);
    assert_eq!(groups, [65534], "initgroups(nobody, nogroup)");
    // --group: that primary group instead (daemon, gid 1, exists on every Debian).
    let (uids, gids, groups) = worker_ids("sys-group", &["--user", "nobody", "--group", "daemon"]);
    assert_eq!(uids, [65534; 4]);
    assert_eq!(gids, [1; 4]);
    assert_eq!(groups, [1], "initgroups(nobody, daemon)");
    // A user who is a member of other groups keeps them.
    match a_member() {
        Some((user, member_of)) => {
            let (_, _, groups) = worker_ids("sys-member", &["--user", &user]);
            for gid in member_of {
                assert!(groups.contains(&gid), "{user}'s group {gid} in {groups:?}");
            }
        }
        None => {
            eprintln!("SKIPPED the member part: no user on this machine is listed in /etc/group")
        }
    }
}

#[test]
fn an_unknown_group_is_named() {
    let (out, _home) = run_to_end(&[
        "--group",
        "no-such-group-herd",
        "--name",
        "sys-nogroup",
        "sleep",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--group") && err.contains("no-such-group-herd"),
        "{err}"
    );
}
