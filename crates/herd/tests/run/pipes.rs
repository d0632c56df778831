//! Every command that prints exits 0, quietly, when its reader is gone (`herd ls | head -0`):
//! `println!` would panic there, and the release profile aborts on a panic.

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Stdio;

use super::start_inherit;
use crate::util::{cli_command, home_of, spawn_command, WAIT};

/// A pipe whose read end is already closed: every write to it fails with EPIPE.
fn closed_pipe() -> OwnedFd {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: pipe2 succeeded: both descriptors are new and owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    write
}

#[test]
fn commands_exit_quietly_into_a_closed_pipe() {
    let name = "pipes";
    let herd = start_inherit(1, &["--name", name]);
    herd.wait_ready();
    let home = home_of(&herd);
    let commands: [&[&str]; 6] = [
        &["ls"],
        &["ls", "--json"],
        &["status", name],
        &["status", name, "--json"],
        &["logs", name, "-n", "100"],
        &["--help"],
    ];
    for args in commands {
        let mut cmd = cli_command(&home, args);
        cmd.stdout(Stdio::from(closed_pipe()));
        let out = spawn_command(cmd, args).finish(WAIT);
        assert_eq!(out.code, Some(0), "into a closed pipe\n{out}");
        assert!(!out.stderr.contains("panicked"), "{out}");
        assert!(out.stderr.is_empty(), "nothing to say on stderr\n{out}");
    }
}
