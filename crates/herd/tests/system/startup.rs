//! `herd startup systemd`: the unit text, checked by systemd itself where it is installed,
//! and `--install` where systemd is not running.

use std::path::Path;
use std::process::Command;

use crate::util::system::which;
use crate::util::{herd_bin, prerequisite_missing, TempDir};

fn startup(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> std::process::Output {
    let mut cmd = Command::new(herd_bin());
    cmd.current_dir(dir)
        .arg("startup")
        .arg("systemd")
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run herd startup")
}

fn verify(unit: &Path) {
    let Some(analyze) = which("systemd-analyze") else {
        prerequisite_missing("systemd-analyze (Debian package systemd)");
        return;
    };
    let out = Command::new(analyze)
        .arg("verify")
        .arg(unit)
        .output()
        .expect("run systemd-analyze");
    assert!(
        out.status.success(),
        "systemd-analyze verify {}: {}\n{}",
        unit.display(),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(unit).unwrap_or_default()
    );
}

#[test]
fn startup_systemd_prints_a_unit_systemd_accepts() {
    let dir = TempDir::new();
    let out = startup(
        dir.path(),
        &[
            "-i",
            "max",
            "-l",
            "127.0.0.1:3000",
            "--kill-timeout",
            "7s",
            "app.js",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let exec = format!(
        "ExecStart={} run --name app -i max -l 127.0.0.1:3000 --kill-timeout 7s app.js",
        herd_bin()
    );
    for line in [
        "Type=notify",
        exec.as_str(),
        "KillMode=mixed",
        "TimeoutStopSec=17s",
        "NoNewPrivileges=yes",
        &format!("WorkingDirectory={}", dir.path().display()),
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
    }
    let unit = dir.join("herd-app.service");
    std::fs::write(&unit, &text).expect("write");
    verify(&unit);

    let out = startup(dir.path(), &["herd.toml"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert!(
        text.contains(&format!(
            "ExecStart={} run {}/herd.toml --app %i\n",
            herd_bin(),
            dir.path().display()
        )),
        "{text}"
    );
    // A template is checked as one of its instances.
    let unit = dir.join("herd@web.service");
    std::fs::write(&unit, &text).expect("write");
    verify(&unit);
}

#[test]
fn startup_systemd_refuses_what_herd_run_would() {
    let dir = TempDir::new();
    let out = startup(dir.path(), &["-i", "0", "app.js"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--instances"), "{err}");
}

#[test]
fn install_without_systemd_writes_the_unit_and_says_so() {
    if Path::new("/run/systemd/system").is_dir() {
        // systemd runs here: --install would really enable a unit on this machine.
        eprintln!(
            "SKIPPED install_without_systemd_writes_the_unit_and_says_so: systemd is running"
        );
        return;
    }
    let dir = TempDir::new();
    let config = dir.join("config");
    let out = startup(
        dir.path(),
        &["--user", "--install", "-l", "3000", "app.js"],
        &[("XDG_CONFIG_HOME", &config)],
    );
    assert_eq!(out.status.code(), Some(1), "exits non-zero after writing");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("systemd is not the service manager here"),
        "{err}"
    );
    let unit = std::fs::read_to_string(config.join("systemd/user/herd-app.service"))
        .expect("the unit was written");
    assert!(unit.contains("WantedBy=default.target"), "{unit}");
}

/// herd under `Type=notify` with `WatchdogSec=`: `READY=1` once the workers are ready, then
/// `WATCHDOG=1` every half period, then `STOPPING=1`.
#[test]
fn herd_tells_its_manager_ready_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = TempDir::new();
    let path = dir.join("notify");
    let manager = UnixDatagram::bind(&path).expect("bind the manager's socket");
    manager
        .set_read_timeout(Some(crate::util::WAIT))
        .expect("timeout");
    let notify = format!("NOTIFY_SOCKET={}", path.display());
    let mut herd = crate::util::Herd::start_wrapped(
        &["env", &notify, "WATCHDOG_USEC=200000"],
        &[
            "-i",
            "1",
            "--name",
            "sys-notify",
            "--ready",
            "delay:20ms",
            "sleep",
            "600",
        ],
        None,
    );
    let mut buf = [0u8; 512];
    let mut next = || {
        let n = manager.recv(&mut buf).expect("a datagram from herd");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut seen = Vec::new();
    while !(seen.iter().any(|m: &String| m.contains("READY=1"))
        && seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2)
    {
        assert!(
            seen.len() < 200,
            "no READY=1 and two WATCHDOG=1 in {seen:?}"
        );
        seen.push(next());
    }
    assert_eq!(herd.stop().code(), Some(0));
    loop {
        let m = next();
        if m.contains("STOPPING=1") {
            break;
        }
        assert!(m.contains("WATCHDOG=1"), "unexpected {m:?}");
    }
}
