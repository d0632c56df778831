//! herd reaps the orphans its workers leave, as a subreaper and as PID 1, without taking
//! its workers' exit statuses; TERM to herd as PID 1 stops it cleanly; the exit status
//! tells a clean stop from errored workers.

use std::time::{Duration, Instant};

use crate::util::system::{children_of, is_root, state_of};
use crate::util::{fixture, prerequisite_missing, Herd, TempDir, WAIT};

/// Waits for the worker line `orphan PID` and returns PID.
fn orphan_pid(herd: &Herd) -> u32 {
    let line = herd.wait_line_after(0, "orphan ");
    line["line"]
        .as_str()
        .and_then(|l| l.trim().strip_prefix("orphan "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line}"))
}

fn wait_gone(pid: u32, what: &str) {
    let deadline = Instant::now() + WAIT;
    while let Some((state, ppid)) = state_of(pid) {
        assert!(
            Instant::now() < deadline,
            "{what}: pid {pid} still there (state {state}, parent {ppid}) — a zombie nobody reaped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_workers_orphan_comes_to_herd_and_is_reaped() {
    let dir = TempDir::new();
    let release = dir.join("release");
    let release_env = format!("RELEASE={}", release.display());
    let app = fixture("system_orphan.py");
    let mut herd = Herd::start(&[
        "-i",
        "1",
        "--name",
        "sys-orphan",
        "--ready",
        "delay:50ms",
        "-e",
        &release_env,
        &app,
    ]);
    herd.wait_ready();
    let orphan = orphan_pid(&herd);
    // It was re-parented to herd (the subreaper), not to the machine's PID 1.
    let herd_pid = herd.pid();
    crate::util::poll_until("the orphan re-parented to herd (subreaper)", || {
        state_of(orphan).and_then(|(_, ppid)| (ppid == herd_pid).then_some(()))
    });
    std::fs::write(&release, b"").expect("release the orphan");
    wait_gone(orphan, "the released orphan");
    // herd's own worker is untouched and its status still belongs to herd.
    assert_eq!(herd.worker_pids().len(), 1);
    let status = herd.stop();
    assert_eq!(status.code(), Some(0), "{}", herd.dump());
    herd.assert_no_worker_left();
}

/// `unshare --pid --fork --mount-proc herd run …`: herd is PID 1 of a new pid namespace.
fn start_as_pid1(args: &[&str]) -> Option<(Herd, u32)> {
    if !is_root() {
        prerequisite_missing("root, to make a pid namespace with unshare");
        return None;
    }
    if crate::util::system::which("unshare").is_none() {
        prerequisite_missing("unshare (util-linux)");
        return None;
    }
    let herd = Herd::start_wrapped(&["unshare", "--pid", "--fork", "--mount-proc"], args, None);
    let unshare = herd.pid();
    let pid1 = crate::util::poll_until("herd under unshare", || {
        children_of(unshare).first().copied()
    });
    Some((herd, pid1))
}

#[test]
fn herd_as_pid1_reaps_orphans_and_stops_cleanly_on_term() {
    let dir = TempDir::new();
    let release = dir.join("release");
    let release_env = format!("RELEASE={}", release.display());
    let app = fixture("system_orphan.py");
    let Some((mut herd, pid1)) = start_as_pid1(&[
        "-i",
        "2",
        "--name",
        "sys-pid1",
        "--ready",
        "delay:50ms",
        "-e",
        &release_env,
        &app,
    ]) else {
        return;
    };
    herd.wait_ready();
    // Two orphans (one per worker), named by their pid inside the namespace; find them
    // from here as herd's children that are not its workers.
    let _ = orphan_pid(&herd);
    let orphans = crate::util::poll_until("two orphans adopted by herd (PID 1)", || {
        let kids: Vec<u32> = children_of(pid1)
            .into_iter()
            .filter(|&k| {
                std::fs::read_to_string(format!("/proc/{k}/cmdline"))
                    .is_ok_and(|c| c.contains("herd-system-orphan"))
            })
            .collect();
        (kids.len() == 2).then_some(kids)
    });
    std::fs::write(&release, b"").expect("release the orphans");
    for orphan in orphans {
        wait_gone(orphan, "an orphan of herd as PID 1");
    }
    // SIGTERM from outside the namespace reaches PID 1 because herd handles it.
    // SAFETY: kill(2) on herd, which this test started (through unshare).
    unsafe { libc::kill(pid1 as i32, libc::SIGTERM) };
    let status = herd.expect_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "clean stop exits 0\n{}",
        herd.dump()
    );
    let events = herd.events();
    assert!(
        events.iter().any(|e| e["event"] == "stopping"),
        "herd stopped on SIGTERM\n{}",
        herd.dump()
    );
}

#[test]
fn herd_as_pid1_exits_nonzero_when_every_worker_errored() {
    let dir = TempDir::new();
    let release_env = format!("RELEASE={}", dir.join("never").display());
    let app = fixture("system_orphan.py");
    let Some((mut herd, _)) = start_as_pid1(&[
        "-i",
        "1",
        "--name",
        "sys-errored",
        "--max-restarts",
        "1",
        "--restart-delay",
        "10ms",
        "-e",
        "CRASH=1",
        "-e",
        &release_env,
        &app,
    ]) else {
        return;
    };
    let status = herd.expect_exit();
    assert_eq!(
        status.code(),
        Some(1),
        "errored workers exit 1\n{}",
        herd.dump()
    );
}
