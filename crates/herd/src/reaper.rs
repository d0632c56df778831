//! herd as a child subreaper, and as PID 1 in a container.
//!
//! A worker is often a wrapper (`npm start` → sh → node) or a server that forks helpers.
//! When such a process dies, its children are re-parented to the nearest *subreaper*
//! ancestor, else to PID 1, and someone must reap them when they exit or they stay zombies
//! (in a container where herd is PID 1, nobody else would). herd marks itself a subreaper
//! at start (`PR_SET_CHILD_SUBREAPER`, also when not PID 1) and reaps what comes to it.
//!
//! # Not stealing the workers' exit statuses
//!
//! Workers are waited on individually (spawn.rs: a pidfd, then `waitpid(pid)`), so the
//! reaper must never reap one of them: `waitpid(-1)` or `waitid(P_ALL)` would. Instead every
//! child herd spawns on purpose is *claimed* here, under one lock held from before the fork
//! until its pid is recorded ([`spawn_claimed`]), and released only after it was reaped by
//! its owner. On SIGCHLD (and once at exit) the reaper lists herd's children
//! (`/proc/self/task/*/children`) and reaps, with `waitpid(pid, WNOHANG)`, only those not
//! claimed: adopted orphans. It holds the same lock while it does, so no pid can be spawned
//! and not yet claimed meanwhile. A child that has not exited yet is left alone (WNOHANG).

use std::collections::BTreeSet;
use std::io;
use std::sync::{Mutex, MutexGuard};

/// Pids of children herd spawned and reaps itself.
static CLAIMED: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn claimed() -> MutexGuard<'static, BTreeSet<u32>> {
    CLAIMED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Makes herd the reaper of its orphaned descendants.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: a plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `spawn` (a fork) with the claim lock held and claims the child's pid, so the reaper
/// never sees it unclaimed. Release it with [`release`] once its owner has reaped it.
pub fn spawn_claimed<T>(
    spawn: impl FnOnce() -> io::Result<T>,
    pid: impl FnOnce(&T) -> Option<u32>,
) -> io::Result<T> {
    let mut set = claimed();
    let child = spawn()?;
    if let Some(pid) = pid(&child) {
        set.insert(pid);
    }
    Ok(child)
}

/// The owner has reaped `pid`: it is no longer herd's child.
pub fn release(pid: u32) {
    claimed().remove(&pid);
}

/// Releases a pid when dropped (for a child whose owner reaps it on some path of its own).
pub struct Claim(pub u32);

impl Drop for Claim {
    fn drop(&mut self) {
        release(self.0);
    }
}

/// Reaps every exited child that is not claimed; returns how many.
pub fn reap_orphans() -> usize {
    reap_unclaimed(children)
}

/// Reaps those of `children` (listed with the lock held) that exited and are not claimed.
fn reap_unclaimed(children: impl FnOnce() -> Vec<u32>) -> usize {
    let set = claimed();
    let mut reaped = 0;
    for pid in children() {
        if set.contains(&pid) {
            continue;
        }
        let Ok(raw) = i32::try_from(pid) else {
            continue;
        };
        let mut status = 0;
        // SAFETY: waitpid on one pid, without blocking.
        if unsafe { libc::waitpid(raw, &mut status, libc::WNOHANG) } == raw {
            reaped += 1;
        }
    }
    reaped
}

/// herd's children: from `/proc/self/task/*/children` (each thread's), or, where the kernel
/// lacks that file, every process whose parent is herd.
fn children() -> Vec<u32> {
    let mut pids = Vec::new();
    let mut found = false;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                found = true;
                pids.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    if found {
        return pids;
    }
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let parent = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| {
                let (_, rest) = s.rsplit_once(')')?;
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            });
        if parent == Some(me) {
            pids.push(pid);
        }
    }
    pids
}

/// Reaps adopted orphans on every SIGCHLD until the runtime ends.
pub fn watch() -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigchld = signal(SignalKind::child())?;
    tokio::task::spawn_local(async move {
        // One pass first: orphans may have arrived before the handler was installed.
        reap_orphans();
        while sigchld.recv().await.is_some() {
            reap_orphans();
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn claimed_children_are_left_to_their_owner() {
        let mut mine =
            spawn_claimed(|| Command::new("true").spawn(), |c| Some(c.id())).expect("spawn");
        let stray = Command::new("true").spawn().expect("spawn");
        let stray_pid = stray.id();
        drop(stray);
        // Both exit; only the unclaimed one may be reaped. (Only these two are offered:
        // other tests in this process have children of their own.)
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::path::Path::new(&format!("/proc/{stray_pid}")).exists() {
            reap_unclaimed(|| vec![mine.id(), stray_pid]);
            assert!(std::time::Instant::now() < deadline, "stray never reaped");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let status = mine.wait().expect("the owner still gets the status");
        assert!(status.success());
        release(mine.id());
    }
}
