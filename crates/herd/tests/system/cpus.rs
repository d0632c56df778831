//! `-i max` counts the CPUs herd may use: its affinity mask and its cgroup CPU quota (v2, or v1).

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
/// Where a test may make a child cgroup with a CPU quota of one CPU: cgroup v2 with the
/// `cpu` controller (`cpu.max`), else v1's `cpu` hierarchy (`cpu.cfs_quota_us`).
enum CpuHierarchy {
    V2(std::path::PathBuf),
    V1(std::path::PathBuf),
}

fn cpu_hierarchy() -> Result<CpuHierarchy, String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let mount = |want: &dyn Fn(&str, &str) -> bool| {
        info.lines().find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mut sup = right.split_whitespace();
            let (fstype, options) = (sup.next()?, sup.nth(1).unwrap_or(""));
            want(fstype, options)
                .then(|| left.split_whitespace().nth(4).map(std::path::PathBuf::from))?
        })
    };
    if let Some(v2) = mount(&|fs, _| fs == "cgroup2") {
        let controllers =
            std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "cpu") {
            return Ok(CpuHierarchy::V2(v2));
        }
    }
    mount(&|fs, opts| fs == "cgroup" && opts.split(',').any(|o| o == "cpu"))
        .map(CpuHierarchy::V1)
        .ok_or_else(|| "no cgroup hierarchy with the cpu controller is mounted".into())
}

/// Says a test skipped past cargo's output capture, so a skip is never silent.
fn skipped(test: &str, why: &str) {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    let line = format!("\n!!! SKIPPED {test}: {why}\n");
    // SAFETY: fd 2 is open for the whole test run; ManuallyDrop keeps it open afterwards.
    let mut stderr = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(2) });
    let _ = stderr.write_all(line.as_bytes());
}

#[test]
fn max_honours_a_cgroup_cpu_quota() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let skip = |why: &str| skipped("max_honours_a_cgroup_cpu_quota", why);
    if !is_root() {
        return skip("not root");
    }
    if cpus < 2 {
        return skip("one CPU: a quota of one CPU would not change -i max");
    }
    let hierarchy = match cpu_hierarchy() {
        Ok(h) => h,
        Err(why) => return skip(&why),
    };
    let (mount, quota_file, quota) = match &hierarchy {
        CpuHierarchy::V2(mount) => {
            let _ = std::fs::write(mount.join("cgroup.subtree_control"), "+cpu");
            (mount.clone(), "cpu.max", "100000 100000")
        }
        CpuHierarchy::V1(mount) => (mount.clone(), "cpu.cfs_quota_us", "100000"),
    };
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
    if let Err(e) = std::fs::write(group.join(quota_file), quota) {
        return skip(&format!("cannot set {quota_file}: {e}"));
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
