//! fork/exec of one worker, with fds at fixed numbers and a correct `LISTEN_PID`.
//!
//! `LISTEN_PID` must be the worker's own pid, which exists only after `fork()`. std's
//! `Command` builds the environment before forking and installs it after the `pre_exec`
//! hooks, so a `setenv` in a hook is lost (and allocating after fork can deadlock). So the
//! hook here finishes the job itself with buffers allocated in the parent and raw,
//! async-signal-safe syscalls (specs/socket-activation.md, "the trap"):
//!
//! 1. parent-death signal: the worker gets SIGKILL if herd dies, so nothing is orphaned;
//! 2. the signal mask herd inherited (tokio blocks nothing, but a parent may) is cleared;
//! 3. each fd to pass is first duplicated above the target range (`F_DUPFD_CLOEXEC`), then
//!    `dup2`'d to 3, 4, … — two phases, so a source that sits on a target number is never
//!    overwritten before it is copied, and `dup2` clears close-on-exec on the result;
//! 4. every fd above the targets is marked close-on-exec (`close_range(CLOEXEC)`, not
//!    closed: std's error pipe must survive until `execve` so a failed exec is reported);
//! 5. the pid is written as digits into the pre-allocated `LISTEN_PID=` slot of envp;
//! 6. `execve` with the program path resolved in the parent.
//!
//! std has already put stdin/stdout/stderr in place, moved the child into its own process
//! group and changed directory and user when the hook runs.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Stdio;

use tokio::process::{Child, Command};

/// The first fd number a worker's passed sockets get.
pub const FIRST_FD: RawFd = 3;

/// What to start.
pub struct SpawnRequest<'a> {
    /// Absolute path of the executable (resolved by the caller: no PATH search after fork).
    pub program: &'a Path,
    /// argv, including argv[0].
    pub argv: &'a [OsString],
    /// The complete environment, without `LISTEN_PID`.
    pub env: &'a [(OsString, OsString)],
    /// Add `LISTEN_PID=<the worker's pid>`.
    pub listen_pid: bool,
    /// Placed at fds 3, 4, … in this order.
    pub fds: &'a [BorrowedFd<'a>],
    pub cwd: Option<&'a Path>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Starts the worker. Its stdout and stderr are pipes; stdin is /dev/null.
pub fn spawn(req: &SpawnRequest<'_>) -> io::Result<Child> {
    let mut image = ExecImage::new(req)?;
    let mut cmd = Command::new(req.program);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    if let Some(cwd) = req.cwd {
        cmd.current_dir(cwd);
    }
    if let Some(gid) = req.gid {
        cmd.gid(gid);
    }
    if let Some(uid) = req.uid {
        cmd.uid(uid);
    }
    // SAFETY: the hook only calls async-signal-safe functions on memory allocated before
    // fork (see `ExecImage::exec`).
    unsafe {
        cmd.pre_exec(move || image.exec());
    }
    cmd.spawn()
}

/// argv, envp and fd plan, laid out before fork so the child needs no allocation.
struct ExecImage {
    path: CString,
    _strings: Vec<Vec<u8>>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// Points at the digits part of the `LISTEN_PID=` entry, if any (21 bytes of room).
    listen_pid_digits: Option<*mut u8>,
    fds: Vec<RawFd>,
    parent: libc::pid_t,
}

// SAFETY: the raw pointers point into `_strings`, which the struct owns and never changes
// after construction; the image is only used in the forked child.
unsafe impl Send for ExecImage {}
unsafe impl Sync for ExecImage {}

const LISTEN_PID: &[u8] = b"LISTEN_PID=";
const PID_DIGITS: usize = 20;

fn cstring(bytes: &[u8], what: &str) -> io::Result<Vec<u8>> {
    if bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        ));
    }
    let mut v = Vec::with_capacity(bytes.len() + 1);
    v.extend_from_slice(bytes);
    v.push(0);
    Ok(v)
}

impl ExecImage {
    fn new(req: &SpawnRequest<'_>) -> io::Result<Self> {
        let path = CString::new(req.program.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "program path has a NUL"))?;
        let mut strings = Vec::with_capacity(req.argv.len() + req.env.len() + 1);
        for arg in req.argv {
            strings.push(cstring(arg.as_bytes(), "an argument")?);
        }
        let argc = strings.len();
        for (key, value) in req.env {
            let mut kv = Vec::with_capacity(key.len() + value.len() + 1);
            kv.extend_from_slice(key.as_bytes());
            kv.push(b'=');
            kv.extend_from_slice(value.as_bytes());
            strings.push(cstring(&kv, "an environment variable")?);
        }
        if req.listen_pid {
            let mut slot = Vec::with_capacity(LISTEN_PID.len() + PID_DIGITS + 1);
            slot.extend_from_slice(LISTEN_PID);
            slot.resize(LISTEN_PID.len() + PID_DIGITS + 1, 0);
            strings.push(slot);
        }
        let mut argv: Vec<_> = strings[..argc].iter().map(|s| s.as_ptr().cast()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<_> = strings[argc..].iter().map(|s| s.as_ptr().cast()).collect();
        envp.push(std::ptr::null());
        let listen_pid_digits = if req.listen_pid {
            let slot = strings.last_mut().expect("pushed above");
            // SAFETY: the slot has LISTEN_PID.len() + PID_DIGITS + 1 bytes.
            Some(unsafe { slot.as_mut_ptr().add(LISTEN_PID.len()) })
        } else {
            None
        };
        Ok(ExecImage {
            path,
            _strings: strings,
            argv,
            envp,
            listen_pid_digits,
            fds: req.fds.iter().map(|fd| fd.as_raw_fd()).collect(),
            parent: rustix::process::getpid().as_raw_nonzero().get(),
        })
    }

    /// Runs in the forked child. Returns only on failure.
    fn exec(&mut self) -> io::Result<()> {
        // SAFETY: every call below is async-signal-safe and touches only memory this image
        // owns (allocated before fork) or the process's own fd table.
        unsafe {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != self.parent {
                // herd died between fork and prctl: the signal will never come.
                libc::_exit(1);
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

            let above = FIRST_FD + self.fds.len() as RawFd;
            for fd in self.fds.iter_mut() {
                let moved = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, above);
                if moved < 0 {
                    return Err(io::Error::last_os_error());
                }
                *fd = moved;
            }
            for (i, fd) in self.fds.iter().enumerate() {
                if libc::dup2(*fd, FIRST_FD + i as RawFd) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            mark_cloexec_from(above);

            if let Some(digits) = self.listen_pid_digits {
                write_decimal(digits, libc::getpid() as u64);
            }
            libc::execve(self.path.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr());
            Err(io::Error::last_os_error())
        }
    }
}

/// Marks every fd >= `first` close-on-exec.
unsafe fn mark_cloexec_from(first: RawFd) {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: plain syscalls on the fd table.
    unsafe {
        let done = libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        ) == 0;
        if !done {
            // Kernels before 5.11: walk the table up to the soft limit.
            let mut limit: libc::rlimit = std::mem::zeroed();
            let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                limit.rlim_cur.min(1 << 16) as RawFd
            } else {
                1024
            };
            for fd in first..max {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
    }
}

/// Writes `n` as decimal digits plus a NUL at `out` (room for 21 bytes), without allocating.
unsafe fn write_decimal(out: *mut u8, mut n: u64) {
    let mut tmp = [0u8; PID_DIGITS];
    let mut len = 0;
    loop {
        tmp[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: len <= 20 and the slot has 21 bytes.
        unsafe { *out.add(i) = tmp[len - 1 - i] };
    }
    // SAFETY: as above.
    unsafe { *out.add(len) = 0 };
}

/// Finds `program` the way a shell would: a path with a slash as it is, else in `PATH`.
/// Returns an absolute path to an executable regular file.
pub fn resolve_program(program: &str, cwd: Option<&Path>) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let check = |path: &Path| -> Result<(), String> {
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => format!("{} does not exist", path.display()),
            _ => format!("{}: {e}", path.display()),
        })?;
        if !meta.is_file() {
            return Err(format!("{} is not a file", path.display()));
        }
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(format!(
                "{} is not executable: chmod +x it, or name an interpreter with --interpreter",
                path.display()
            ));
        }
        Ok(())
    };
    if program.contains('/') {
        let path = Path::new(program);
        let path = match (path.is_absolute(), cwd) {
            (true, _) => path.to_path_buf(),
            (false, Some(cwd)) => cwd.join(path),
            (false, None) => std::env::current_dir()
                .map_err(|e| e.to_string())?
                .join(path),
        };
        check(&path)?;
        return Ok(path);
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| OsStr::new("/usr/bin:/bin").into());
    for dir in std::env::split_paths(&search) {
        let candidate = dir.join(program);
        if check(&candidate).is_ok() {
            return Ok(if candidate.is_absolute() {
                candidate
            } else {
                std::env::current_dir()
                    .map_err(|e| e.to_string())?
                    .join(candidate)
            });
        }
    }
    Err(format!(
        "`{program}` was not found in PATH; give its path (e.g. ./{program}) or install it"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_without_allocation() {
        let mut buf = [0xffu8; 21];
        unsafe { write_decimal(buf.as_mut_ptr(), 4312) };
        assert_eq!(&buf[..5], b"4312\0");
        unsafe { write_decimal(buf.as_mut_ptr(), 0) };
        assert_eq!(&buf[..2], b"0\0");
        unsafe { write_decimal(buf.as_mut_ptr(), u64::MAX) };
        assert_eq!(&buf[..21], b"18446744073709551615\0");
    }

    #[test]
    fn programs_resolve_through_path() {
        let sh = resolve_program("sh", None).expect("sh is in PATH");
        assert!(sh.is_absolute());
        assert!(resolve_program("no-such-program-herd", None)
            .unwrap_err()
            .contains("not found"));
        assert!(resolve_program("./no/such", None)
            .unwrap_err()
            .contains("does not exist"));
    }
}
