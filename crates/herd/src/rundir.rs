//! The run directory: one per `herd run`, holding the workers' notify sockets (and the Node
//! keep-alive drain script).
//!
//! - Its name is `herd-PID-RANDOM` (16 hex digits from the kernel's random source), made
//!   with an exclusive `mkdir` (mode 0700): an existing name is never reused, a name another
//!   user planted is never entered. It lives in the private `HERD_HOME`, or with `--user` in
//!   the temp directory (the workers' user cannot enter `HERD_HOME`).
//! - It stays herd's: with `--user` only its *group* becomes the workers' group and its mode
//!   0710, so workers can reach a socket inside but cannot create, rename or remove anything
//!   there (and, in the sticky temp directory, cannot move the directory itself). Each
//!   socket is made 0600 and chowned to the worker with `fchownat(dirfd, name,
//!   AT_SYMLINK_NOFOLLOW)`; nothing inside is ever reached by a path another user can change.
//! - A herd killed with SIGKILL cannot remove its directory, so every `herd run` first
//!   removes those of dead herds of the same user: only real directories (not symlinks)
//!   named like ours, owned by our uid, whose recorded pid is gone, and only their plain
//!   entries, all through directory fds.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

const PREFIX: &str = "herd-";

/// Creates a fresh run directory in `parent`, after removing stale ones there.
pub fn create(parent: &Path) -> Result<PathBuf, String> {
    let parent_fd = open_dir(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let st = rustix::fs::fstat(&parent_fd).map_err(|e| format!("{}: {e}", parent.display()))?;
    // A directory everyone may write to must be sticky, or others could move ours away.
    if st.st_mode & 0o002 != 0 && st.st_mode & 0o1000 == 0 {
        return Err(format!(
            "{} is writable by every user but not sticky (chmod +t); point TMPDIR at a safe directory",
            parent.display()
        ));
    }
    remove_stale(&parent_fd);
    let pid = std::process::id();
    for _ in 0..8 {
        let name = format!("{PREFIX}{pid}-{}", random_hex()?);
        match rustix::fs::mkdirat(&parent_fd, name.as_str(), Mode::from_raw_mode(0o700)) {
            Ok(()) => {
                let path = parent.join(&name);
                // mkdir applies the umask: make the mode exact.
                let dir = open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o700))
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                return Ok(path);
            }
            Err(rustix::io::Errno::EXIST) => continue,
            Err(e) => {
                return Err(format!(
                    "cannot create a run directory in {}: {e}",
                    parent.display()
                ))
            }
        }
    }
    Err(format!(
        "cannot create a run directory in {}: every random name was taken",
        parent.display()
    ))
}

/// Opens a run directory made by [`create`]: a real directory (not a symlink), ours, and
/// writable by nobody else.
pub fn open(path: &Path) -> io::Result<OwnedFd> {
    let fd = open_dir(path)?;
    let st = rustix::fs::fstat(&fd)?;
    if st.st_uid != rustix::process::geteuid().as_raw() || st.st_mode & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is not herd's private run directory (owner uid {}, mode {:o})",
                path.display(),
                st.st_uid,
                st.st_mode & 0o7777
            ),
        ));
    }
    Ok(fd)
}

/// Lets the workers' group reach sockets inside (mode 0710), and nothing more.
pub fn share_with_group(dir: &OwnedFd, gid: u32) -> io::Result<()> {
    let gid = rustix::fs::Gid::from_raw(gid);
    rustix::fs::fchown(dir, None, Some(gid))?;
    rustix::fs::fchmod(dir, Mode::from_raw_mode(0o710))?;
    Ok(())
}

/// Binds a notify socket `name` in the run directory (`dir` open at `dir_path`): 0600,
/// owned by `owner` (the workers' uid and gid) if given, receiving its senders' credentials.
pub fn bind_notify(
    dir: &OwnedFd,
    dir_path: &Path,
    name: &str,
    owner: Option<(u32, u32)>,
) -> io::Result<UnixDatagram> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(e.into()),
    }
    let sock = UnixDatagram::bind(dir_path.join(name))?;
    // Before any worker exists: every datagram carries who sent it.
    rustix::net::sockopt::set_socket_passcred(&sock, true)?;
    // Only herd can write in the directory, so `name` is the socket just bound.
    rustix::fs::chmodat(dir, name, Mode::from_raw_mode(0o600), AtFlags::empty())?;
    if let Some((uid, gid)) = owner {
        let (uid, gid) = (
            rustix::fs::Uid::from_raw(uid),
            rustix::fs::Gid::from_raw(gid),
        );
        rustix::fs::chownat(dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)?;
    }
    Ok(sock)
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

fn random_hex() -> Result<String, String> {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        use std::io::Read;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(|e| format!("no random source for the run directory's name: {e}"))?;
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `herd-PID-HEX16` → PID.
fn stale_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, hex) = rest.split_once('-')?;
    let hex_ok = hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    let pid_ok = !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
    (hex_ok && pid_ok).then(|| pid.parse().ok()).flatten()
}

/// Removes run directories of dead herds of this user in `parent`. Best effort: anything
/// unexpected is left where it is.
fn remove_stale(parent: &OwnedFd) {
    let Ok(dir) = rustix::fs::Dir::read_from(parent) else {
        return;
    };
    let me = rustix::process::geteuid().as_raw();
    for entry in dir.flatten() {
        let Ok(name) = entry.file_name().to_str() else {
            continue;
        };
        let Some(pid) = stale_pid(name) else {
            continue;
        };
        if alive(pid) {
            continue;
        }
        let name = name.to_owned();
        let _ = remove_one(parent, &name, me);
    }
}

fn alive(pid: i32) -> bool {
    match rustix::process::Pid::from_raw(pid) {
        Some(pid) => !matches!(
            rustix::process::test_kill_process(pid),
            Err(rustix::io::Errno::SRCH)
        ),
        None => true,
    }
}

fn remove_one(parent: &OwnedFd, name: &str, me: u32) -> io::Result<()> {
    let st = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory || st.st_uid != me {
        return Ok(());
    }
    let dir = rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let again = rustix::fs::fstat(&dir)?;
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
        return Ok(());
    }
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(&dir)?.flatten().take(100_000) {
        let n = entry.file_name().to_bytes();
        if n != b"." && n != b".." && entry.file_type() != FileType::Directory {
            names.push(entry.file_name().to_owned());
        }
    }
    for n in names {
        // Plain unlink: a symlink is removed, never followed; a directory is refused.
        let _ = rustix::fs::unlinkat(dir.as_fd(), n.as_c_str(), AtFlags::empty());
    }
    rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn stale_names() {
        assert_eq!(stale_pid("herd-123-0123456789abcdef"), Some(123));
        assert_eq!(stale_pid("herd-123-0123456789abcde"), None);
        assert_eq!(stale_pid("herd-x-0123456789abcdef"), None);
        assert_eq!(stale_pid("herd-app-123"), None);
        assert_eq!(stale_pid("other"), None);
    }

    #[test]
    fn fresh_names_and_stale_cleanup() {
        let base = std::env::temp_dir().join(format!("herd-rundir-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir(&base).expect("base");
        let a = create(&base).expect("create");
        let b = create(&base).expect("create");
        assert_ne!(a, b, "names are random");
        let meta = std::fs::symlink_metadata(&a).expect("meta");
        assert_eq!(meta.mode() & 0o7777, 0o700);
        assert!(open(&a).is_ok());
        // A dead herd's directory (pid 0x7fffffff never exists), with a file and a symlink.
        let dead = base.join("herd-2147483646-00000000000000aa");
        std::fs::create_dir(&dead).expect("dead");
        std::fs::write(dead.join("w1.notify"), "x").expect("file");
        let victim = base.join("victim");
        std::fs::create_dir(&victim).expect("victim");
        std::fs::write(victim.join("keep"), "x").expect("keep");
        std::os::unix::fs::symlink(&victim, dead.join("link")).expect("link");
        // A look-alike symlink to the victim.
        std::os::unix::fs::symlink(&victim, base.join("herd-2147483646-00000000000000bb"))
            .expect("look-alike");
        create(&base).expect("create");
        assert!(!dead.exists(), "the dead herd's directory is removed");
        assert!(victim.join("keep").exists(), "nothing followed a symlink");
        assert!(std::fs::symlink_metadata(base.join("herd-2147483646-00000000000000bb")).is_ok());
        assert!(
            a.exists() && b.exists(),
            "live herds' (our own) directories stay"
        );
        std::fs::remove_dir_all(&base).expect("cleanup");
    }
}
