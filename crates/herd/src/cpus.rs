//! How many CPUs herd may really use, for `-i max`: the smaller of the affinity mask
//! (`taskset`, a container's cpuset) and the cgroup v2 CPU quota (`cpu.max`, what
//! `docker run --cpus 1.5` and Kubernetes' CPU limit set).
//!
//! The quota is read from herd's own cgroup (`0::PATH` in `/proc/self/cgroup`) under the
//! cgroup2 mount found in `/proc/self/mountinfo`, and from every ancestor up to the mount's
//! root: a parent's limit binds its children too, so the smallest wins. `max` means no
//! limit. `QUOTA PERIOD` allows QUOTA/PERIOD CPUs, rounded up (1.5 CPUs run 2 workers,
//! each slowed, rather than 1 that leaves half a CPU unused), and at least 1.
//! On hosts still on cgroup v1 (or hybrid) the `cpu` controller's `cpu.cfs_quota_us` /
//! `cpu.cfs_period_us` (-1: no limit) are read the same way; the smallest of all wins.

use std::path::{Path, PathBuf};

/// The CPUs herd may use: at least 1.
pub fn available() -> usize {
    let affinity = affinity().unwrap_or(usize::MAX);
    let quota = quota(&|p: &Path| std::fs::read_to_string(p).ok()).unwrap_or(usize::MAX);
    let n = affinity.min(quota);
    if n == usize::MAX {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        n.max(1)
    }
}

/// CPUs in herd's affinity mask.
fn affinity() -> Option<usize> {
    // SAFETY: sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into `set`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        usize::try_from(libc::CPU_COUNT(&set))
            .ok()
            .filter(|&n| n > 0)
    }
}

/// The cgroup quota in CPUs (v2, and v1's `cpu` controller where mounted), through `read`
/// (a file's text, or None), for testing.
fn quota(read: &dyn Fn(&Path) -> Option<String>) -> Option<usize> {
    let cgroup = read(Path::new("/proc/self/cgroup"))?;
    let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
    let v2 = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .zip(cgroup2_mount(&mountinfo))
        .and_then(|(own, (root, mount))| {
            smallest_up(own, &root, &mount, &|dir| {
                read(&dir.join("cpu.max")).and_then(|t| parse_cpu_max(&t))
            })
        });
    let v1 = cgroup
        .lines()
        .find_map(|l| {
            let mut fields = l.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            controllers.split(',').any(|c| c == "cpu").then_some(path)
        })
        .zip(cgroup1_cpu_mount(&mountinfo))
        .and_then(|(own, (root, mount))| {
            smallest_up(own, &root, &mount, &|dir| {
                let quota = read(&dir.join("cpu.cfs_quota_us"))?;
                let period = read(&dir.join("cpu.cfs_period_us"))?;
                parse_cpu_max(&format!("{} {}", quota.trim(), period.trim()))
            })
        });
    match (v1, v2) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The smallest `limit` of cgroup `own` (a path in the hierarchy mounted at `mount` from
/// `root`) and of its ancestors up to the mount: a parent's limit binds its children.
fn smallest_up(
    own: &str,
    root: &Path,
    mount: &Path,
    limit: &dyn Fn(&Path) -> Option<usize>,
) -> Option<usize> {
    // Inside a cgroup namespace the path is relative to the namespace's root ("/").
    let relative = Path::new(own)
        .strip_prefix(root)
        .or_else(|_| Path::new(own).strip_prefix("/"))
        .ok()?;
    let mut dir = mount.join(relative);
    let mut smallest: Option<usize> = None;
    loop {
        if let Some(cpus) = limit(&dir) {
            smallest = Some(smallest.map_or(cpus, |s| s.min(cpus)));
        }
        if dir == mount || !dir.pop() || !dir.starts_with(mount) {
            break;
        }
    }
    smallest
}

/// `(root, mount point)` of the cgroup v1 hierarchy that has the `cpu` controller.
fn cgroup1_cpu_mount(mountinfo: &str) -> Option<(PathBuf, PathBuf)> {
    mount_where(mountinfo, |fstype, options| {
        fstype == "cgroup" && options.split(',').any(|o| o == "cpu")
    })
}

/// `(root, mount point)` of the cgroup2 filesystem from `/proc/self/mountinfo`.
fn cgroup2_mount(mountinfo: &str) -> Option<(PathBuf, PathBuf)> {
    mount_where(mountinfo, |fstype, _| fstype == "cgroup2")
}

/// `(root, mount point)` of the first mount whose filesystem type and super options pass.
fn mount_where(mountinfo: &str, wanted: impl Fn(&str, &str) -> bool) -> Option<(PathBuf, PathBuf)> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut super_fields = right.split_whitespace();
        let fstype = super_fields.next()?;
        let options = super_fields.nth(1).unwrap_or("");
        if !wanted(fstype, options) {
            return None;
        }
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let mount = fields.next()?;
        Some((
            PathBuf::from(unescape(root)),
            PathBuf::from(unescape(mount)),
        ))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `cpu.max` ("QUOTA PERIOD" in µs, or "max PERIOD") as whole CPUs, rounded up; None for
/// no limit or text that is not a quota.
pub fn parse_cpu_max(text: &str) -> Option<usize> {
    let mut parts = text.split_whitespace();
    let quota: u64 = parts.next()?.parse().ok()?;
    let period: u64 = parts.next().map_or(Some(100_000), |p| p.parse().ok())?;
    if period == 0 {
        return None;
    }
    usize::try_from(quota.div_ceil(period).max(1)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn cpu_max_rounds_up_and_max_is_no_limit() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("100000 100000\n"), Some(1));
        assert_eq!(parse_cpu_max("150000 100000"), Some(2));
        assert_eq!(parse_cpu_max("200000 100000"), Some(2));
        assert_eq!(parse_cpu_max("1000 100000"), Some(1));
        assert_eq!(parse_cpu_max("50000"), Some(1));
        assert_eq!(parse_cpu_max("100 0"), None);
        assert_eq!(parse_cpu_max("lots 100000"), None);
        assert_eq!(parse_cpu_max(""), None);
    }

    fn fake(files: &[(&str, &str)]) -> impl Fn(&Path) -> Option<String> {
        let map: HashMap<PathBuf, String> = files
            .iter()
            .map(|(p, t)| (PathBuf::from(p), t.to_string()))
            .collect();
        move |p: &Path| map.get(p).cloned()
    }

    const MOUNTINFO: &str = "24 30 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n\
                             25 30 0:23 / /proc rw - proc proc rw\n";

    #[test]
    fn the_smallest_quota_up_the_hierarchy_wins() {
        let read = fake(&[
            ("/proc/self/cgroup", "0::/system.slice/web.service\n"),
            ("/proc/self/mountinfo", MOUNTINFO),
            (
                "/sys/fs/cgroup/system.slice/web.service/cpu.max",
                "max 100000\n",
            ),
            ("/sys/fs/cgroup/system.slice/cpu.max", "250000 100000\n"),
        ]);
        assert_eq!(quota(&read), Some(3));
        let read = fake(&[
            ("/proc/self/cgroup", "0::/a/b\n"),
            ("/proc/self/mountinfo", MOUNTINFO),
            ("/sys/fs/cgroup/a/b/cpu.max", "50000 100000\n"),
            ("/sys/fs/cgroup/a/cpu.max", "400000 100000\n"),
        ]);
        assert_eq!(quota(&read), Some(1));
    }

    #[test]
    fn no_cgroup2_or_no_limit_is_no_quota() {
        let read = fake(&[
            ("/proc/self/cgroup", "0::/a\n"),
            (
                "/proc/self/mountinfo",
                "25 30 0:23 / /proc rw - proc proc rw\n",
            ),
        ]);
        assert_eq!(quota(&read), None);
        let read = fake(&[
            ("/proc/self/cgroup", "0::/\n"),
            ("/proc/self/mountinfo", MOUNTINFO),
            ("/sys/fs/cgroup/cpu.max", "max 100000\n"),
        ]);
        assert_eq!(quota(&read), None);
        let read = fake(&[
            ("/proc/self/cgroup", "4:memory:/x\n"),
            ("/proc/self/mountinfo", MOUNTINFO),
        ]);
        assert_eq!(quota(&read), None);
    }

    #[test]
    fn a_container_sees_its_namespace_root() {
        // A cgroup namespace: the path is "/", the mount's root is the container's cgroup.
        let read = fake(&[
            ("/proc/self/cgroup", "0::/\n"),
            (
                "/proc/self/mountinfo",
                "900 800 0:30 /docker/abc /sys/fs/cgroup ro - cgroup2 cgroup rw\n",
            ),
            ("/sys/fs/cgroup/cpu.max", "150000 100000\n"),
        ]);
        assert_eq!(quota(&read), Some(2));
        let read = fake(&[
            ("/proc/self/cgroup", "0::/x y/z\n"),
            (
                "/proc/self/mountinfo",
                "24 30 0:22 / /mnt/c\\040g rw - cgroup2 cgroup2 rw\n",
            ),
            ("/mnt/c g/x y/cpu.max", "100000 100000\n"),
        ]);
        assert_eq!(quota(&read), Some(1));
    }

    #[test]
    fn cgroup_v1_cpu_quota_is_read_and_the_smaller_of_v1_and_v2_wins() {
        let mountinfo =
            "30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                         31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let read = fake(&[
            (
                "/proc/self/cgroup",
                "5:memory:/m\n4:cpu,cpuacct:/docker/abc\n",
            ),
            ("/proc/self/mountinfo", mountinfo),
            (
                "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us",
                "150000\n",
            ),
            (
                "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us",
                "100000\n",
            ),
            ("/sys/fs/cgroup/cpu,cpuacct/docker/cpu.cfs_quota_us", "-1\n"),
            (
                "/sys/fs/cgroup/cpu,cpuacct/docker/cpu.cfs_period_us",
                "100000\n",
            ),
        ]);
        assert_eq!(quota(&read), Some(2));
        // -1 everywhere: no limit.
        let read = fake(&[
            ("/proc/self/cgroup", "4:cpu,cpuacct:/\n"),
            ("/proc/self/mountinfo", mountinfo),
            ("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n"),
            ("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n"),
        ]);
        assert_eq!(quota(&read), None);
        // Hybrid: both, the smaller wins.
        let hybrid = format!("{mountinfo}{MOUNTINFO}");
        let read = fake(&[
            ("/proc/self/cgroup", "4:cpu,cpuacct:/a\n0::/b\n"),
            ("/proc/self/mountinfo", &hybrid),
            ("/sys/fs/cgroup/cpu,cpuacct/a/cpu.cfs_quota_us", "300000\n"),
            ("/sys/fs/cgroup/cpu,cpuacct/a/cpu.cfs_period_us", "100000\n"),
            ("/sys/fs/cgroup/b/cpu.max", "100000 100000\n"),
        ]);
        assert_eq!(quota(&read), Some(1));
    }

    #[test]
    fn available_is_at_least_one_and_at_most_the_affinity() {
        let n = available();
        assert!(n >= 1);
        assert!(n <= affinity().unwrap_or(usize::MAX));
    }
}
