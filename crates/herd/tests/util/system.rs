//! Harness pieces for tests/system: herd started under a wrapper that execs it or forks it
//! (`systemd-socket-activate`, `taskset`, `unshare`, a socket holder), with the harness's
//! usual JSON event reading.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use super::{herd_bin, Herd, TempDir, SCRUBBED_ENV};

impl Herd {
    /// `WRAPPER… herd run --log-format json ARGS…`, with `HERD_HOME` in a fresh temp dir.
    /// `fd3`: a socket placed at fd 3 of the wrapper (a holder's listening socket).
    pub fn start_wrapped(wrapper: &[&str], args: &[&str], fd3: Option<std::os::fd::RawFd>) -> Herd {
        let home = TempDir::new();
        let mut cmd = Command::new(wrapper[0]);
        cmd.args(&wrapper[1..])
            .arg(herd_bin())
            .arg("run")
            .arg("--log-format")
            .arg("json")
            .args(args);
        for var in SCRUBBED_ENV {
            cmd.env_remove(var);
        }
        cmd.env("HERD_HOME", home.path().join("home"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(fd) = fd3 {
            // SAFETY: dup2 is async-signal-safe; the fd is open in the parent.
            unsafe {
                cmd.pre_exec(move || {
                    // dup2(3, 3) does nothing, close-on-exec included: clear it instead.
                    let done = if fd == 3 {
                        libc::fcntl(3, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(fd, 3)
                    };
                    if done < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        Herd::spawn(cmd, home)
    }
}

/// The direct children of `pid` (all its threads').
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}

/// `(state, ppid)` from `/proc/PID/stat`, or None once the pid is gone (reaped).
pub fn state_of(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether the current process is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `program`'s path in PATH, if installed.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
