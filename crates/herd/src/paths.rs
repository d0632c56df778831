//! Where herd keeps its runtime files: `HERD_HOME`, else `$XDG_RUNTIME_DIR/herd`, else
//! `~/.herd`. The directory is private (0700, owned by the user): the control and notify
//! sockets in it must be reachable by their owner only.
//!
//! An app's files in it are named after the app, so a name is an [`AppName`], checked when
//! the command line is parsed: no name can reach a file outside `HERD_HOME`. The directory
//! is held open as a [`Home`] and its entries are used relative to that descriptor.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rustix::fs::{FileType, Mode, OFlags};

/// What makes an app name, for error messages.
pub const NAME_RULE: &str = "an app name is 1 to 64 letters, digits, `.`, `_` or `-`, starts with a letter or digit and has no `..`";

/// An app's name, valid by construction: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}` without `..`.
/// It names `HERD_HOME/<name>.sock`, `.lock` and `.log`, so it can never be a path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AppName(String);

impl AppName {
    pub fn new(name: &str) -> Result<AppName, String> {
        let bytes = name.as_bytes();
        let valid = (1..=64).contains(&bytes.len())
            && bytes[0].is_ascii_alphanumeric()
            && bytes
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && !name.contains("..");
        if valid {
            Ok(AppName(name.to_string()))
        } else {
            Err(format!(
                "`{}` is not an app name: {NAME_RULE}",
                name.escape_debug()
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// The app's file in `HERD_HOME` with this extension (`sock`, `lock`, `log`).
    pub fn file(&self, ext: &str) -> String {
        format!("{}.{ext}", self.0)
    }
}

impl FromStr for AppName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        AppName::new(s)
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for AppName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

pub fn herd_home() -> Result<PathBuf, String> {
    if let Some(home) = std::env::var_os("HERD_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return Ok(Path::new(&xdg).join("herd"));
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => Ok(Path::new(&home).join(".herd")),
        None => Err("cannot find a home for herd's runtime files: set HERD_HOME".into()),
    }
}

/// Why `HERD_HOME` or a file in it cannot be used. An io error is the source, not part of
/// the message: shown with `{:#}` (as `main` does) it reads `CONTEXT: CAUSE`.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("cannot create {}", .0.display())]
    Create(PathBuf, #[source] std::io::Error),
    #[error("cannot open {}", .0.display())]
    Open(PathBuf, #[source] std::io::Error),
    #[error("{}", .0.display())]
    Stat(PathBuf, #[source] std::io::Error),
    #[error("cannot make {} private", .0.display())]
    Chmod(PathBuf, #[source] std::io::Error),
    #[error("{} belongs to another user (uid {}); set HERD_HOME to a directory of your own", .0.display(), .1)]
    Foreign(PathBuf, u32),
    #[error("{} is a symbolic link; herd will not follow it: remove it", .0.display())]
    Link(PathBuf),
    #[error("{} is not a regular file of yours; herd leaves it alone: remove it or use another --name", .0.display())]
    NotOurs(PathBuf),
}

/// `HERD_HOME`, open. Whatever its path comes to mean later, the checks made on this
/// descriptor (a directory of ours, 0700) hold for every entry used through it.
pub struct Home {
    path: PathBuf,
    fd: OwnedFd,
}

impl Home {
    /// Creates `path` if needed, opens it and makes sure it is this user's and private.
    pub fn open(path: &Path) -> Result<Home, HomeError> {
        let at = || path.to_path_buf();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| HomeError::Create(at(), e))?;
        let me = rustix::process::geteuid().as_raw();
        let foreign = |uid: u32| HomeError::Foreign(at(), uid);
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match std::fs::metadata(path) {
            // Another user's private directory cannot even be opened: say whose it is.
            Ok(meta) if meta.uid() != me => foreign(meta.uid()),
            _ => HomeError::Open(at(), e.into()),
        })?;
        let stat = rustix::fs::fstat(&fd).map_err(|e| HomeError::Stat(at(), e.into()))?;
        if stat.st_uid != me {
            return Err(foreign(stat.st_uid));
        }
        if stat.st_mode & 0o077 != 0 {
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700))
                .map_err(|e| HomeError::Chmod(at(), e.into()))?;
        }
        Ok(Home {
            path: path.to_path_buf(),
            fd,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// `HERD_HOME/<file>` for messages.
    pub fn display(&self, file: &str) -> PathBuf {
        self.path.join(file)
    }

    /// A path that reaches `<file>` through this descriptor (`/proc/self/fd/N/<file>`), for
    /// the calls that take no directory fd (`bind`, `connect` of a unix socket). Without
    /// /proc, the plain path.
    pub fn entry(&self, file: &str) -> PathBuf {
        let via_fd = PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()));
        if via_fd.is_dir() {
            via_fd.join(file)
        } else {
            self.path.join(file)
        }
    }

    /// The type and owner of `<file>`, the entry itself (a link is not followed); `None`
    /// when there is none.
    pub fn lstat(&self, file: &str) -> std::io::Result<Option<(FileType, u32)>> {
        match rustix::fs::statat(&self.fd, file, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some((FileType::from_raw_mode(st.st_mode), st.st_uid))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A second descriptor of the directory, for what outlives a borrow of this one.
    pub fn try_clone_fd(&self) -> std::io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Removes `<file>` (the entry itself, never what a link points to).
    pub fn unlink(&self, file: &str) -> std::io::Result<()> {
        rustix::fs::unlinkat(&self.fd, file, rustix::fs::AtFlags::empty()).map_err(Into::into)
    }

    /// Opens (creating, mode 0600) the regular file `<file>` of ours: a link, a fifo or
    /// another user's file there is refused.
    pub fn open_private_file(&self, file: &str, flags: OFlags) -> Result<std::fs::File, HomeError> {
        let at = || self.display(file);
        match open_private_at(&self.fd, file, flags) {
            Ok((fd, _)) => Ok(std::fs::File::from(fd)),
            Err(PrivateOpenError::Open(rustix::io::Errno::LOOP)) => Err(HomeError::Link(at())),
            Err(PrivateOpenError::Open(e)) => Err(HomeError::Open(at(), e.into())),
            Err(PrivateOpenError::NotOurs { .. }) => Err(HomeError::NotOurs(at())),
            Err(PrivateOpenError::Io(e)) => Err(HomeError::Stat(at(), e.into())),
        }
    }

    /// The names of the sockets of ours in this directory, `<name>.sock` with a valid name
    /// (nothing is followed: a link, a file or another user's socket is not an app).
    pub fn apps(&self) -> Vec<AppName> {
        let Ok(dir) = rustix::fs::Dir::read_from(&self.fd) else {
            return Vec::new();
        };
        let me = rustix::process::geteuid().as_raw();
        let mut names: Vec<AppName> = dir
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let file = entry.file_name().to_str().ok()?;
                let name = AppName::new(file.strip_suffix(".sock")?).ok()?;
                match self.lstat(file) {
                    Ok(Some((FileType::Socket, uid))) if uid == me => Some(name),
                    _ => None,
                }
            })
            .collect();
        names.sort();
        names
    }
}

/// Why [`open_private_at`] refused.
#[derive(Debug)]
pub enum PrivateOpenError {
    /// `openat` failed (`ELOOP`: a symbolic link; `ENXIO`: a fifo without a reader).
    Open(rustix::io::Errno),
    /// Not a regular file of this user: what is there.
    NotOurs { regular: bool, uid: u32 },
    /// `fstat` or `fcntl` failed.
    Io(rustix::io::Errno),
}

/// Opens (creating, mode 0600) `name` in `dir` with `flags`, never through a symbolic link,
/// and only a regular file of this user; back to blocking I/O once open (`O_NONBLOCK` only
/// keeps a fifo from stalling the open). Returns its `fstat` for checks of the caller's own.
pub fn open_private_at(
    dir: impl AsFd,
    name: impl rustix::path::Arg,
    flags: OFlags,
) -> Result<(OwnedFd, rustix::fs::Stat), PrivateOpenError> {
    let fd = rustix::fs::openat(
        dir,
        name,
        flags
            | OFlags::CREATE
            | OFlags::NOFOLLOW
            | OFlags::CLOEXEC
            | OFlags::NOCTTY
            | OFlags::NONBLOCK,
        Mode::from_raw_mode(0o600),
    )
    .map_err(PrivateOpenError::Open)?;
    let stat = rustix::fs::fstat(&fd).map_err(PrivateOpenError::Io)?;
    let regular = FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile;
    if !regular || stat.st_uid != rustix::process::geteuid().as_raw() {
        return Err(PrivateOpenError::NotOurs {
            regular,
            uid: stat.st_uid,
        });
    }
    let now = rustix::fs::fcntl_getfl(&fd).map_err(PrivateOpenError::Io)?;
    rustix::fs::fcntl_setfl(&fd, now - OFlags::NONBLOCK).map_err(PrivateOpenError::Io)?;
    Ok((fd, stat))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names_cannot_be_paths() {
        for good in ["app", "web-1", "a.b_c", "A", "9", &"x".repeat(64)] {
            assert!(AppName::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "../victim",
            "..",
            "a..b",
            "/abs/path",
            "a/b",
            ".hidden",
            "-flag",
            "_x",
            "sp ace",
            "nul\0",
            "é",
            &"x".repeat(65),
        ] {
            let err = AppName::new(bad).expect_err(bad);
            assert!(err.contains("not an app name"), "{err}");
        }
    }

    #[test]
    fn home_is_used_through_its_descriptor() {
        let dir = std::env::temp_dir().join(format!("herd-paths-{}", std::process::id()));
        let home = Home::open(&dir).expect("open");
        assert_eq!(std::fs::metadata(&dir).expect("meta").mode() & 0o777, 0o700);
        std::os::unix::fs::symlink("/etc/passwd", dir.join("x.log")).expect("symlink");
        let err = home
            .open_private_file("x.log", OFlags::WRONLY | OFlags::APPEND)
            .expect_err("a link is refused")
            .to_string();
        assert!(err.contains("symbolic link"), "{err}");
        let _listener = std::os::unix::net::UnixListener::bind(home.entry("a.sock")).expect("bind");
        std::os::unix::fs::symlink(dir.join("a.sock"), dir.join("b.sock")).expect("symlink");
        std::fs::write(dir.join("c.sock"), b"").expect("file");
        let names: Vec<String> = home.apps().into_iter().map(AppName::into_string).collect();
        assert_eq!(names, ["a"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
