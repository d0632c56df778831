//! `-i max` counts the CPUs herd may use: its affinity mask and its cgroup v2 CPU quota.

use crate::util::system::{is_root, which};
use crate::util::{prerequisite_missing, Herd};

fn spawned(herd: &Herd) -> usize {
    herd.events()
        .iter()
        .filter(|e| e["event"] == "spawned")
        .count()
}

fn max_args(name: &str) -> Vec<&str> {
    vec![
        "-i",
        "max",
        "--name",
        name,
        "--ready",
        "delay:20ms",
        "sleep",
        "600",
    ]
}

#[test]
fn max_under_taskset_runs_one_worker() {
    if which("taskset").is_none() {
        prerequisite_missing("taskset (util-linux)");
        return;
    }
    let herd = Herd::start_wrapped(&["taskset", "-c", "0"], &max_args("sys-taskset"), None);
    herd.wait_ready();
    assert_eq!(spawned(&herd), 1, "{}", herd.dump());
}

/// The cgroup2 mount point, if there is one.
fn cgroup2_mount() -> Option<std::path::PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(std::path::PathBuf::from))?
    })
}

#[test]
fn max_honours_a_cgroup_v2_cpu_quota() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let skip = |why: &str| eprintln!("SKIPPED max_honours_a_cgroup_v2_cpu_quota: {why}");
    if !is_root() {
        return skip("not root");
    }
    if cpus < 2 {
        return skip("one CPU: a quota of one CPU would not change -i max");
    }
    let Some(mount) = cgroup2_mount() else {
        return skip("no cgroup2 filesystem mounted");
    };
    let controllers = std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
    if !controllers.split_whitespace().any(|c| c == "cpu") {
        return skip(&format!(
            "the cpu controller is not available in cgroup v2 at {} (a hybrid or v1 host)",
            mount.display()
        ));
    }
    let _ = std::fs::write(mount.join("cgroup.subtree_control"), "+cpu");
    let group = mount.join(format!("herd-test-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir(&group) {
        return skip(&format!(
            "cannot create {}: {e} (read-only cgroup fs?)",
            group.display()
        ));
    }
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _remove = Remove(group.clone());
    if let Err(e) = std::fs::write(group.join("cpu.max"), "100000 100000") {
        return skip(&format!("cannot set cpu.max: {e}"));
    }
    let procs = group.join("cgroup.procs");
    let procs = procs.to_string_lossy();
    // The wrapper moves itself into the group, then execs herd (no user input in the script).
    let mut herd = Herd::start_wrapped(
        &["sh", "-c", "echo $$ > \"$0\" && exec \"$@\"", &procs],
        &max_args("sys-quota"),
        None,
    );
    herd.wait_ready();
    assert_eq!(
        spawned(&herd),
        1,
        "a 1-CPU quota runs one worker\n{}",
        herd.dump()
    );
    assert_eq!(herd.stop().code(), Some(0));
}
