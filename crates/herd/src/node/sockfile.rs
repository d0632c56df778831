//! Unix socket files herd makes: whose rights make them, and how they are removed.
//!
//! A worker's `listen(path)` is bound in a short-lived helper process (herd re-executed with
//! [`HELPER_ARG`]) that first drops to the worker's uid and gid, with no supplementary
//! groups, exactly as the worker runs. The kernel then checks every directory, symlink and
//! permission on the path as it would for the worker, so herd cannot be made to create,
//! replace or chmod a file the worker could not (root-only directories, other users' files).
//! The helper answers over a socketpair with the listening socket and an `O_PATH` fd of the
//! directory the socket file is in (SCM_RIGHTS). herd awaits the answer without blocking its
//! thread, for at most [`HELPER_TIMEOUT`]: a hung filesystem costs one killed helper.
//!
//! Every step after the directory is opened works on that directory fd, not on the path: the
//! stale check (connect probes through `/proc/self/fd/N/NAME`), the chmod (through an
//! `O_PATH|O_NOFOLLOW` fd of the new entry) and the removal. Only `bind` itself takes the path,
//! so that `getsockname` shows it; the entry it made is then proven to be the one in the
//! directory fd (a connect through the entry's own `O_PATH` fd reaches the new listener,
//! SO_PEERCRED says from this process), or the bind is refused. herd keeps the directory fd
//! and the entry's (dev, inode); removal, in a helper with the same rights, unlinks the entry
//! in that directory only while it is still a socket with that inode. A worker that swaps a
//! directory of its path for a symlink changes nothing: the directory fd is the directory
//! herd bound in.
//!
//! An entry already at the path is removed before bind only if it is a socket that nothing
//! answers on: a connect with each socket type (stream, datagram, seqpacket) is refused. A
//! live socket of any type, one the worker may not connect to, or a file that is not a socket
//! is left alone and answered with EADDRINUSE, as Node alone would.
//!
//! `--listen` paths, named by the operator, are bound by herd itself with its own rights, but
//! through the same directory-fd steps ([`bind_here`], [`SocketFile::remove_here`]).

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use herd_proto::fdpass;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use crate::plan::BACKLOG;

/// `herd HELPER_ARG`: run as the socket-file helper (reads its request on fd 0).
pub const HELPER_ARG: &str = "__herd-sockfile-helper";

/// The longest herd waits for a helper. Binding takes milliseconds; only a filesystem that
/// does not answer (a stuck network or FUSE mount) takes longer.
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest request or reply (a path is at most 107 bytes; this leaves room for words).
const MAX_MESSAGE: usize = 4096;

/// Why a bind failed: the errno the worker is answered with (positive) and the problem in
/// words for herd's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub errno: i32,
    pub problem: String,
}

impl Failure {
    fn new(errno: Errno, problem: impl Into<String>) -> Self {
        Failure {
            errno: errno.raw_os_error(),
            problem: problem.into(),
        }
    }
}

/// Whose rights the helper runs with: the workers' (`--user`, `--group` and the user's
/// supplementary groups).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// A socket file herd made: the directory it was made in (held open), its name there, and
/// the inode it got. Removed only while that entry is still this socket.
#[derive(Debug)]
pub struct SocketFile {
    dir: OwnedFd,
    name: CString,
    dev: u64,
    ino: u64,
    /// The rights it was made with, and is removed with (`None`: herd's own).
    creds: Option<Creds>,
}

impl SocketFile {
    /// Removes the file in a helper with the rights that made it. `Ok(false)`: the entry is
    /// gone or is no longer this socket, and was left alone.
    pub async fn remove(self) -> Result<bool, Failure> {
        let mut request = format!(
            "unlink\n{}\n{} {}\n",
            creds_line(self.creds.as_ref()),
            self.dev,
            self.ino
        )
        .into_bytes();
        request.extend_from_slice(self.name.as_bytes());
        let (reply, _) = ask_helper(&request, Some(self.dir.as_fd())).await?;
        Ok(reply == b"removed")
    }

    /// Removes the file with herd's own rights: only for files herd made as itself.
    pub fn remove_here(&self) -> io::Result<bool> {
        Ok(unlink_if_same(&self.dir, &self.name, self.dev, self.ino)?)
    }
}

// ---- the steps, on a directory fd ----

/// The directory part of `path` and the name in it. The name must be a plain entry name.
fn split(path: &Path) -> Result<(&Path, CString), Failure> {
    let bytes = path.as_os_str().as_bytes();
    let (dir, name) = match bytes.iter().rposition(|&b| b == b'/') {
        Some(0) => (&b"/"[..], &bytes[1..]),
        Some(i) => (&bytes[..i], &bytes[i + 1..]),
        None => (&b"."[..], bytes),
    };
    if name.is_empty() || name == b"." || name == b".." {
        return Err(Failure::new(
            Errno::INVAL,
            format!(
                "{} does not name a socket file; give a path like /run/app/app.sock",
                path.display()
            ),
        ));
    }
    let name = CString::new(name).map_err(|_| {
        Failure::new(
            Errno::INVAL,
            format!("{} contains a NUL byte", path.display()),
        )
    })?;
    Ok((Path::new(OsStr::from_bytes(dir)), name))
}

/// An `O_PATH` fd of `dir`, opened with the caller's rights.
fn open_dir(dir: &Path) -> Result<OwnedFd, Failure> {
    rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        let problem = match e {
            Errno::NOENT => format!(
                "directory {} does not exist; create it first",
                dir.display()
            ),
            Errno::NOTDIR => format!("{} is not a directory", dir.display()),
            Errno::ACCESS => format!(
                "permission denied: the workers' user may not enter {}",
                dir.display()
            ),
            e => format!("cannot open directory {}: {e}", dir.display()),
        };
        Failure::new(e, problem)
    })
}

/// The address of `name` in `dir`, reached through the directory fd.
fn addr_in(dir: BorrowedFd<'_>, name: &CStr) -> Result<SocketAddrUnix, Failure> {
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name.to_bytes());
    SocketAddrUnix::new(path.as_slice()).map_err(|e| {
        Failure::new(
            e,
            format!("the socket name {:?} is too long", name.to_string_lossy()),
        )
    })
}

fn is_socket(stat: &rustix::fs::Stat) -> bool {
    FileType::from_raw_mode(stat.st_mode) == FileType::Socket
}

/// Whether the socket file `name` is stale: every connect to it, with each socket type, is
/// refused. Any other answer (accepted, would block, wrong type, permission denied) means
/// something may be using it.
fn stale(dir: BorrowedFd<'_>, name: &CStr) -> Result<bool, Failure> {
    let addr = addr_in(dir, name)?;
    for ty in [SocketType::STREAM, SocketType::DGRAM, SocketType::SEQPACKET] {
        let probe = rustix::net::socket_with(
            AddressFamily::UNIX,
            ty,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| Failure::new(e, format!("cannot make a socket: {e}")))?;
        match rustix::net::connect(&probe, &addr) {
            Err(Errno::CONNREFUSED) => {}
            _ => return Ok(false),
        }
    }
    Ok(true)
}

/// Binds and listens on a unix stream socket at `path`, whose entry must turn out to be
/// `name` in `dir`; made with no more than `mode` and then given exactly `mode`. Returns the
/// socket and the file's (dev, ino).
fn bind_in(
    dir: BorrowedFd<'_>,
    name: &CStr,
    mode: u32,
    path: &Path,
) -> Result<(OwnedFd, u64, u64), Failure> {
    let shown = path.display();
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(found) => {
            if !is_socket(&found) {
                return Err(Failure::new(
                    Errno::ADDRINUSE,
                    format!("{shown} exists and is not a socket; remove it or pick another path"),
                ));
            }
            if !stale(dir, name)? {
                return Err(Failure::new(
                    Errno::ADDRINUSE,
                    format!("{shown} is in use by a running server (or one the workers may not reach); stop it or pick another path"),
                ));
            }
            // Still the very socket found refused?
            let again = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| Failure::new(e, format!("{shown}: {e}")))?;
            if !is_socket(&again) || (again.st_dev, again.st_ino) != (found.st_dev, found.st_ino) {
                return Err(Failure::new(
                    Errno::ADDRINUSE,
                    format!("{shown} changed while herd checked it; try again"),
                ));
            }
            rustix::fs::unlinkat(dir, name, AtFlags::empty())
                .map_err(|e| Failure::new(e, format!("cannot remove stale {shown}: {e}")))?;
        }
        Err(Errno::NOENT) => {}
        Err(e) => return Err(Failure::new(e, format!("{shown}: {e}"))),
    }
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| Failure::new(e, format!("cannot make a socket: {e}")))?;
    let mode = Mode::from_raw_mode(mode & 0o777);
    // Linux makes the file with the socket inode's mode (less the umask): this way it never
    // exists with more than `mode`, not even for a moment.
    let _ = rustix::fs::fchmod(&socket, mode);
    // Bound by its own path, so that getsockname (Node's `server.address()`, a socket-
    // activation worker's sockname) shows it; which entry that made is checked below.
    let addr = SocketAddrUnix::new(path)
        .map_err(|e| Failure::new(e, format!("{shown} is too long for a socket path")))?;
    rustix::net::bind(&socket, &addr).map_err(|e| {
        let problem = match e {
            Errno::ACCESS => format!("permission denied: the workers' user may not create {shown}"),
            Errno::ADDRINUSE => format!("{shown} already exists; remove it or pick another path"),
            e => format!("cannot bind {shown}: {e}"),
        };
        Failure::new(e, problem)
    })?;
    rustix::net::listen(&socket, BACKLOG)
        .map_err(|e| Failure::new(e, format!("cannot listen on {shown}: {e}")))?;
    let entry = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Failure::new(e, format!("{shown} is not where herd bound it: {e}")))?;
    let made = rustix::fs::fstat(&entry).map_err(|e| Failure::new(e, format!("{shown}: {e}")))?;
    if !is_socket(&made) || !is_ours(&socket, &entry)? {
        return Err(Failure::new(
            Errno::ADDRINUSE,
            format!("{shown} changed while herd bound it (a directory on the path was replaced); try again"),
        ));
    }
    if Mode::from_raw_mode(made.st_mode) & Mode::from_raw_mode(0o7777) != mode {
        // The umask took bits `mode` asks for: set them on this very entry (the O_PATH fd,
        // not the name, which could have been swapped since).
        let entry_path = format!("/proc/self/fd/{}", entry.as_raw_fd());
        rustix::fs::chmod(entry_path.as_str(), mode)
            .map_err(|e| Failure::new(e, format!("cannot chmod {shown}: {e}")))?;
    }
    Ok((socket, made.st_dev, made.st_ino))
}

/// Whether the socket file `entry` (an `O_PATH` fd) is the one `listener` is bound to: a
/// connect through that very inode reaches `listener` (SO_PEERCRED names this process).
fn is_ours(listener: &OwnedFd, entry: &OwnedFd) -> Result<bool, Failure> {
    let fail = |e: Errno| Failure::new(e, format!("cannot check the new socket file: {e}"));
    let target = SocketAddrUnix::new(format!("/proc/self/fd/{}", entry.as_raw_fd()).as_str())
        .map_err(fail)?;
    let probe = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )
    .map_err(fail)?;
    match rustix::net::connect(&probe, &target) {
        Ok(()) => {}
        // Refused, or another socket type there: not ours.
        Err(_) => return Ok(false),
    }
    let me = rustix::process::getpid();
    // Someone else may have connected in the same instant; ours is among the first few.
    for _ in 0..64 {
        match rustix::net::accept_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC) {
            Ok(conn) => {
                if rustix::net::sockopt::socket_peercred(&conn).is_ok_and(|c| c.pid == me) {
                    return Ok(true);
                }
            }
            Err(Errno::INTR) => {}
            Err(_) => return Ok(false),
        }
    }
    Ok(false)
}

/// Unlinks `name` in `dir` if it is still the socket (dev, ino). `Ok(false)`: left alone.
fn unlink_if_same(dir: &OwnedFd, name: &CStr, dev: u64, ino: u64) -> rustix::io::Result<bool> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if is_socket(&st) && st.st_dev == dev && st.st_ino == ino => {
            rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
            Ok(true)
        }
        Ok(_) | Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Binds `path` with herd's own rights (operator-named `--listen` paths).
pub fn bind_here(path: &Path, mode: u32) -> Result<(OwnedFd, SocketFile), Failure> {
    let (dir, name) = split(path)?;
    let dir = open_dir(dir)?;
    let (socket, dev, ino) = bind_in(dir.as_fd(), &name, mode, path)?;
    Ok((
        socket,
        SocketFile {
            dir,
            name,
            dev,
            ino,
            creds: None,
        },
    ))
}

// ---- herd's side of the helper ----

/// `UID GID[ G1,G2,…]`, or `-` for herd's own rights.
fn creds_line(creds: Option<&Creds>) -> String {
    match creds {
        Some(c) if c.groups.is_empty() => format!("{} {}", c.uid, c.gid),
        Some(c) => {
            let groups: Vec<String> = c.groups.iter().map(u32::to_string).collect();
            format!("{} {} {}", c.uid, c.gid, groups.join(","))
        }
        None => "-".into(),
    }
}

/// Binds `path` for a worker, in a helper with `creds` (`None`: herd's own rights).
pub async fn bind_as(
    creds: Option<Creds>,
    path: &Path,
    mode: u32,
) -> Result<(OwnedFd, SocketFile), Failure> {
    let (_, name) = split(path)?;
    let mut request = format!("bind\n{}\n{mode:o}\n", creds_line(creds.as_ref())).into_bytes();
    request.extend_from_slice(path.as_os_str().as_bytes());
    if request.len() >= MAX_MESSAGE {
        return Err(Failure::new(
            Errno::NAMETOOLONG,
            format!("{} is too long for a socket path", path.display()),
        ));
    }
    let (reply, fds) = ask_helper(&request, None).await?;
    let ids = std::str::from_utf8(&reply)
        .ok()
        .and_then(|r| r.split_once(' '))
        .and_then(|(d, i)| Some((d.parse().ok()?, i.parse().ok()?)));
    let mut fds = fds.into_iter();
    match (ids, fds.next(), fds.next()) {
        (Some((dev, ino)), Some(socket), Some(dir))
            if rustix::net::sockopt::socket_type(&socket) == Ok(SocketType::STREAM) =>
        {
            Ok((
                socket,
                SocketFile {
                    dir,
                    name,
                    dev,
                    ino,
                    creds,
                },
            ))
        }
        _ => Err(Failure::new(
            Errno::IO,
            "the socket helper gave a malformed answer",
        )),
    }
}

/// Runs one helper: sends `request` (with `fd`), returns the `ok` reply's text and fds.
async fn ask_helper(
    request: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> Result<(Vec<u8>, Vec<OwnedFd>), Failure> {
    let internal = |what: &str, e: io::Error| {
        Failure::new(
            Errno::from_io_error(&e).unwrap_or(Errno::IO),
            format!("cannot run the socket helper ({what}): {e}"),
        )
    };
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| internal("socketpair", e.into()))?;
    fdpass::send(&ours, request, fd).map_err(|e| internal("request", e))?;
    rustix::io::ioctl_fionbio(&ours, true).map_err(|e| internal("fionbio", e.into()))?;
    // /proc/self/exe: this very binary, even if the file was replaced since herd started.
    let mut command = tokio::process::Command::new("/proc/self/exe");
    command
        .arg(HELPER_ARG)
        .env_clear()
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    // Claimed (reaper.rs) so herd's orphan reaper leaves it to tokio, which reaps it; the
    // claim is released after `child` drops (declared first, dropped last).
    let mut claim = crate::reaper::Claim(0);
    let mut child = crate::reaper::spawn_claimed(|| command.spawn(), |c| c.id())
        .map_err(|e| internal("spawn", e))?;
    claim.0 = child.id().unwrap_or(0);
    // SAFETY: the AsyncFd owns the fd, so it stays open and the same for its whole life.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ours, tokio::io::Interest::READABLE)
    };
    let ours = registered.map_err(|e| internal("register", e.into_parts().1))?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut fds = Vec::new();
    let read = async {
        loop {
            let mut ready = ours.readable().await?;
            if let Ok(result) = ready.try_io(|fd| fdpass::recv(fd.get_ref(), &mut buf, &mut fds)) {
                return result;
            }
        }
    };
    let n = match tokio::time::timeout(HELPER_TIMEOUT, read).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return Err(internal("answer", e)),
        Err(_) => {
            let _ = child.start_kill();
            return Err(Failure::new(
                Errno::TIMEDOUT,
                format!(
                    "the socket helper did not answer within {}s (a filesystem that hangs?)",
                    HELPER_TIMEOUT.as_secs()
                ),
            ));
        }
    };
    // It exits right after answering; reap it (or leave it to the runtime's reaper).
    let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
    let reply = &buf[..n];
    if let Some(rest) = reply.strip_prefix(b"ok\n") {
        return Ok((rest.to_vec(), fds));
    }
    let text = String::from_utf8_lossy(reply.strip_prefix(b"err\n").unwrap_or(reply));
    let (errno, problem) = text.split_once('\n').unwrap_or(("", &text));
    match errno.parse::<i32>() {
        Ok(errno) if errno > 0 => Err(Failure {
            errno,
            problem: problem.to_string(),
        }),
        _ if n == 0 => Err(Failure::new(
            Errno::IO,
            "the socket helper exited without an answer",
        )),
        _ => Err(Failure::new(
            Errno::IO,
            "the socket helper gave a malformed answer",
        )),
    }
}

// ---- the helper process ----

/// The helper's `main`: one request on fd 0, one answer, exit.
pub fn helper_main() -> ExitCode {
    // SAFETY: fd 0 is the socketpair herd gave as stdin; it stays open for the whole run.
    let chan = unsafe { BorrowedFd::borrow_raw(0) };
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut fds = Vec::new();
    let n = match fdpass::recv(chan, &mut buf, &mut fds) {
        Ok(n) if n > 0 => n,
        _ => return ExitCode::from(2),
    };
    let (answer, out) = match serve(&buf[..n], fds) {
        Ok((text, out)) => {
            let mut answer = b"ok\n".to_vec();
            answer.extend_from_slice(&text);
            (answer, out)
        }
        Err(f) => (
            format!("err\n{}\n{}", f.errno, f.problem).into_bytes(),
            Vec::new(),
        ),
    };
    let borrowed: Vec<BorrowedFd<'_>> = out.iter().map(AsFd::as_fd).collect();
    match fdpass::send_many(chan, &answer, &borrowed) {
        Ok(_) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(2),
    }
}

/// One request: `bind\nCREDS\nMODE\nPATH` or `unlink\nCREDS\nDEV INO\nNAME` (+ dir fd).
fn serve(request: &[u8], mut fds: Vec<OwnedFd>) -> Result<(Vec<u8>, Vec<OwnedFd>), Failure> {
    let bad = || Failure::new(Errno::INVAL, "malformed request to the socket helper");
    let mut parts = request.splitn(4, |&b| b == b'\n');
    let (Some(op), Some(creds), Some(arg), Some(rest)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let text = |b: &[u8]| {
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|_| bad())
    };
    let creds = match text(creds)?.as_str() {
        "-" => None,
        line => {
            let mut words = line.split(' ');
            let (Some(uid), Some(gid)) = (words.next(), words.next()) else {
                return Err(bad());
            };
            let groups = match words.next() {
                Some(list) => list
                    .split(',')
                    .map(|g| g.parse().map_err(|_| bad()))
                    .collect::<Result<_, _>>()?,
                None => Vec::new(),
            };
            Some(Creds {
                uid: uid.parse().map_err(|_| bad())?,
                gid: gid.parse().map_err(|_| bad())?,
                groups,
            })
        }
    };
    if let Some(creds) = &creds {
        become_user(creds)?;
    }
    match op {
        b"bind" => {
            let mode = u32::from_str_radix(&text(arg)?, 8).map_err(|_| bad())?;
            let path = Path::new(OsStr::from_bytes(rest));
            let (socket, file) = bind_here(path, mode)?;
            let ids = format!("{} {}", file.dev, file.ino).into_bytes();
            Ok((ids, vec![socket, file.dir]))
        }
        b"unlink" => {
            let (dev, ino) = text(arg)?
                .split_once(' ')
                .and_then(|(d, i)| Some((d.parse().ok()?, i.parse().ok()?)))
                .ok_or_else(bad)?;
            let name = CString::new(rest).map_err(|_| bad())?;
            let dir = fds.pop().ok_or_else(bad)?;
            let removed = unlink_if_same(&dir, &name, dev, ino)
                .map_err(|e| Failure::new(e, format!("cannot remove the socket file: {e}")))?;
            let word: &[u8] = if removed { b"removed" } else { b"kept" };
            Ok((word.to_vec(), Vec::new()))
        }
        _ => Err(bad()),
    }
}

/// Drops to `creds` for good (real, effective and saved ids, and the workers'
/// supplementary groups: the bind runs with exactly the workers' rights).
fn become_user(creds: &Creds) -> Result<(), Failure> {
    let fail = |what: &str| {
        let e = io::Error::last_os_error();
        Failure::new(
            Errno::from_io_error(&e).unwrap_or(Errno::PERM),
            format!(
                "cannot switch to uid {} gid {} ({what}): {e}",
                creds.uid, creds.gid
            ),
        )
    };
    // SAFETY: plain syscalls on this process's credentials; this process has one thread.
    unsafe {
        let me = libc::geteuid();
        if me == 0 {
            if libc::setgroups(creds.groups.len(), creds.groups.as_ptr()) != 0 {
                return Err(fail("setgroups"));
            }
            if libc::setgid(creds.gid) != 0 {
                return Err(fail("setgid"));
            }
            if libc::setuid(creds.uid) != 0 {
                return Err(fail("setuid"));
            }
        } else if me == creds.uid {
            if libc::getegid() != creds.gid && libc::setgid(creds.gid) != 0 {
                return Err(fail("setgid"));
            }
        } else {
            return Err(Failure::new(
                Errno::PERM,
                format!("herd (uid {me}) cannot act as uid {}", creds.uid),
            ));
        }
        if libc::getuid() != creds.uid
            || libc::geteuid() != creds.uid
            || libc::getegid() != creds.gid
        {
            return Err(Failure::new(Errno::PERM, "the uid/gid switch did not hold"));
        }
        // Another process of the worker's uid must not inspect or steer this one.
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::net::UnixDatagram;

    fn temp(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("herd-sf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[test]
    fn split_takes_the_last_component_only() {
        let (d, n) = split(Path::new("/run/app.sock")).expect("split");
        assert_eq!((d, n.as_bytes()), (Path::new("/run"), &b"app.sock"[..]));
        let (d, n) = split(Path::new("/x")).expect("split");
        assert_eq!((d, n.as_bytes()), (Path::new("/"), &b"x"[..]));
        let (d, n) = split(Path::new("rel.sock")).expect("split");
        assert_eq!((d, n.as_bytes()), (Path::new("."), &b"rel.sock"[..]));
        for bad in ["/run/", "/run/.", "/run/..", ""] {
            assert!(split(Path::new(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_mode_is_exact_and_removal_checks_the_inode() {
        let dir = temp("mode");
        let path = dir.join("s.sock");
        let (_sock, file) = bind_here(&path, 0o666).expect("bind");
        let name = rustix::net::getsockname(&_sock).expect("getsockname");
        let shown = format!("{name:?}");
        assert!(
            shown.contains("herd-sf-mode"),
            "sockname is the path: {shown}"
        );
        let meta = std::fs::symlink_metadata(&path).expect("stat");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o666);
        assert_eq!((meta.dev(), meta.ino()), (file.dev, file.ino));
        // Replaced by another socket: left alone.
        std::fs::remove_file(&path).expect("rm");
        let _other = UnixDatagram::bind(&path).expect("other");
        assert!(!file.remove_here().expect("remove"));
        assert!(path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_live_socket_of_any_type_is_not_stale() {
        let dir = temp("live");
        let path = dir.join("d.sock");
        let live = UnixDatagram::bind(&path).expect("dgram");
        let err = bind_here(&path, 0o660).expect_err("in use");
        assert_eq!(err.errno, libc::EADDRINUSE, "{err:?}");
        drop(live);
        let (_s, _f) = bind_here(&path, 0o660).expect("stale file replaced");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
