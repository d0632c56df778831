//! fork/exec of one worker, with fds at fixed numbers and a correct `LISTEN_PID`.
//!
//! `LISTEN_PID` must be the worker's own pid, which exists only after `fork()`. std's
//! `Command` builds the environment before forking and installs it after the `pre_exec`
//! hooks, so a `setenv` in a hook is lost (and allocating after fork can deadlock). So the
//! hook here finishes the job itself with buffers allocated in the parent and raw,
//! async-signal-safe syscalls (specs/socket-activation.md, "the trap"):
//!
//! 1. `--user`/`--group`: `setgroups` (the list resolved in the parent, like initgroups),
//!    `setgid`, `setuid`, in that order (each later one needs the rights the earlier ones
//!    still have), then `chdir` with the worker's own rights — first, because a change of
//!    credentials clears the parent-death signal;
//! 2. parent-death signal: the worker gets SIGKILL if herd dies, so nothing is orphaned;
//! 3. the signal mask herd inherited (tokio blocks nothing, but a parent may) is cleared;
//! 4. each fd to pass is first duplicated above the target range (`F_DUPFD_CLOEXEC`), then
//!    `dup2`'d to 3, 4, … — two phases, so a source that sits on a target number is never
//!    overwritten before it is copied, and `dup2` clears close-on-exec on the result;
//! 5. every fd above the targets is marked close-on-exec (`close_range(CLOEXEC)`, not
//!    closed: std's error pipe must survive until `execve` so a failed exec is reported);
//! 6. the pid is written as digits into the pre-allocated `LISTEN_PID=` slot of envp;
//! 7. `execve` with the program path resolved in the parent.
//!
//! std has already put stdin/stdout/stderr in place and moved the child into its own
//! process group when the hook runs. (std's own `uid`/`gid` cannot set supplementary
//! groups on stable Rust, so the hook changes the ids itself.)
//!
//! Every spawn is claimed with the reaper (reaper.rs) before its pid can exit, so herd's
//! orphan reaper never takes a worker's exit status.
//!
//! # Reaping, and signalling only what is still ours
//!
//! A pid (and a process-group id) is only pinned while its process is unreaped: once herd
//! reaps a worker, the kernel may hand its number to an unrelated process, which may make
//! itself a group leader with that number. So herd reaps workers itself, not through tokio:
//! [`wait_exit`] waits on a pidfd for the leader to *exit* (it is then a zombie, and its
//! number is still pinned), SIGKILLs what is left of the group, marks the [`Leader`] reaped
//! and only then reaps it. Every later signal goes through [`Leader::signal_group`], which
//! does nothing once the leader is reaped — a late `KillDue` timer cannot hit a stranger.

use std::cell::Cell;
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::rc::Rc;

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
    /// Supplementary groups (with `uid`); empty drops root's.
    pub groups: &'a [u32],
}

/// Starts the worker. Its stdout and stderr are pipes; stdin is /dev/null. The caller owns
/// the reaping: pass the child to [`wait_exit`] (std's `Child` never reaps on its own).
pub fn spawn(req: &SpawnRequest<'_>) -> io::Result<Child> {
    let mut image = ExecImage::new(req)?;
    let mut cmd = Command::new(req.program);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: the hook only calls async-signal-safe functions on memory allocated before
    // fork (see `ExecImage::exec`).
    unsafe {
        cmd.pre_exec(move || image.exec());
    }
    crate::reaper::spawn_claimed(|| cmd.spawn(), |child| Some(child.id()))
}

/// A worker's process as herd sees it: its pid, which is also its process group's id, and
/// whether herd has reaped it (after which neither number may be signalled).
#[derive(Debug, Clone)]
pub struct Leader {
    pid: u32,
    reaped: Rc<Cell<bool>>,
}

impl Leader {
    pub fn new(pid: u32) -> Self {
        Leader {
            pid,
            reaped: Rc::new(Cell::new(pid == 0)),
        }
    }

    /// Signals the worker's whole process group, only while the leader is unreaped (its
    /// number cannot have been reused then). Returns whether a signal was sent.
    pub fn signal_group(&self, signal: rustix::process::Signal) -> bool {
        if self.reaped.get() {
            return false;
        }
        match rustix::process::Pid::from_raw(self.pid as i32) {
            Some(pid) => rustix::process::kill_process_group(pid, signal).is_ok(),
            None => false,
        }
    }

    #[cfg(test)]
    pub fn reaped(&self) -> bool {
        self.reaped.get()
    }

    #[cfg(test)]
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What [`wait_exit`] does once the leader has exited, for a fake OS's workers.
    #[cfg(test)]
    pub fn set_reaped(&self) {
        self.reaped.set(true);
    }
}

/// Waits for the worker to exit, kills what is left of its process group while the
/// leader's zombie still pins the group's number, marks `leader` reaped, then reaps it.
pub async fn wait_exit(child: Child, leader: Leader) -> io::Result<ExitStatus> {
    let _claim = crate::reaper::Claim(child.id());
    reap(child, leader).await
}

async fn reap(mut child: Child, leader: Leader) -> io::Result<ExitStatus> {
    let result = exited(&child).await;
    // The leader is a zombie now (or waiting failed: then kill it, it is still ours).
    if result.is_err() {
        let _ = child.kill();
    }
    leader.signal_group(rustix::process::Signal::KILL);
    leader.reaped.set(true);
    match result {
        Ok(()) => match child.try_wait()? {
            Some(status) => Ok(status),
            None => child.wait(),
        },
        Err(e) => {
            let _ = child.wait();
            Err(e)
        }
    }
}

/// Returns once `child` has exited, without reaping it.
async fn exited(child: &Child) -> io::Result<()> {
    let pid = rustix::process::Pid::from_raw(child.id() as i32)
        .ok_or_else(|| io::Error::other("worker has no pid"))?;
    match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => {
            // SAFETY: the AsyncFd owns `fd`, which stays open and the same until it drops.
            let fd = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            }?;
            // Readable once the process has exited.
            let _ = fd.readable().await?;
            Ok(())
        }
        Err(_) => {
            // Kernels before 5.3: a blocking waitid that leaves the zombie in place.
            tokio::task::spawn_blocking(move || {
                rustix::process::waitid(
                    rustix::process::WaitId::Pid(pid),
                    rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOWAIT,
                )
                .map(|_| ())
                .map_err(io::Error::from)
            })
            .await
            .map_err(io::Error::other)?
        }
    }
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
    /// `setgroups`, `setgid`, `setuid`, when changing user or group.
    ids: Option<Ids>,
    cwd: Option<CString>,
}

struct Ids {
    groups: Vec<libc::gid_t>,
    gid: Option<libc::gid_t>,
    uid: Option<libc::uid_t>,
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
            ids: (req.uid.is_some() || req.gid.is_some()).then(|| Ids {
                groups: req.groups.to_vec(),
                gid: req.gid,
                uid: req.uid,
            }),
            cwd: match req.cwd {
                Some(dir) => {
                    Some(CString::new(dir.as_os_str().as_bytes()).map_err(|_| {
                        io::Error::new(io::ErrorKind::InvalidInput, "--cwd has a NUL")
                    })?)
                }
                None => None,
            },
        })
    }

    /// Runs in the forked child. Returns only on failure.
    fn exec(&mut self) -> io::Result<()> {
        // SAFETY: every call below is async-signal-safe and touches only memory this image
        // owns (allocated before fork) or the process's own fd table.
        unsafe {
            // First: a change of credentials clears the parent-death signal set below.
            if let Some(ids) = &self.ids {
                // Not root (herd running as `--user` itself): the groups are already that
                // user's, and only root may change them.
                if libc::setgroups(ids.groups.len(), ids.groups.as_ptr()) != 0
                    && libc::geteuid() == 0
                {
                    return Err(io::Error::last_os_error());
                }
                if let Some(gid) = ids.gid {
                    if libc::setgid(gid) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if let Some(uid) = ids.uid {
                    if libc::setuid(uid) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            if let Some(cwd) = &self.cwd {
                if libc::chdir(cwd.as_ptr()) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
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

    /// A child in its own process group that stays until killed.
    fn sleeper() -> Child {
        Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("spawn sleep")
    }

    #[test]
    fn a_reaped_leader_is_never_signalled() {
        let mut child = sleeper();
        let leader = Leader::new(child.id());
        // The state rule: once marked reaped, no signal goes out, whatever the number names.
        leader.reaped.set(true);
        assert!(!leader.signal_group(rustix::process::Signal::KILL));
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "still running"
        );
        // While unreaped, the group is signalled.
        leader.reaped.set(false);
        assert!(leader.signal_group(rustix::process::Signal::KILL));
        let status = child.wait().expect("wait");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(!Leader::new(0).signal_group(rustix::process::Signal::KILL));
    }

    #[test]
    fn wait_exit_kills_the_group_before_reaping() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // The leader leaves a grandchild in its group and exits.
        let child = Command::new("sh")
            .args(["-c", "sleep 30 >/dev/null & echo $!"])
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawn sh");
        let leader = Leader::new(child.id());
        let mut child = child;
        let mut out = String::new();
        use std::io::Read;
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("read");
        let grandchild: i32 = out.trim().parse().expect("grandchild pid");
        let status = rt
            .block_on(wait_exit(child, leader.clone()))
            .expect("status");
        assert!(status.success(), "{status:?}");
        assert!(leader.reaped());
        assert!(!leader.signal_group(rustix::process::Signal::TERM));
        // The grandchild got SIGKILL: wait for it to be gone (it is not our child; init reaps).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat"));
            let gone = stat.map_or(true, |s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.trim_start().chars().next())
                    .is_none_or(|c| c == 'Z' || c == 'X')
            });
            if gone {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "grandchild {grandchild} survived"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
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
