//! `--log-file`: herd's log written to a file of its own, rotated by size, reopened on
//! SIGUSR1.
//!
//! A [`LogFile`] belongs to the writer thread of [`super::out`] (never the runtime thread),
//! so a slow disk delays only that thread, and a failed write loses one batch, which the
//! writer counts and reports (`N lines dropped: <error>`).
//!
//! - **Opening.** herd may be root and the path may be in a directory other users can
//!   write to. The directory is opened once (the path up to it is the user's choice) and
//!   every name in it is used through that descriptor: the file with `O_NOFOLLOW` (a planted
//!   symlink is refused), and only a regular file of ours with one link (no fifo that would
//!   block, no device, no hard link to a file elsewhere) is written.
//! - **Rotation** (`--log-max-size`, `--log-keep`). Before a write would pass the size, at
//!   a line boundary: `NAME.K` is dropped, `NAME.k` becomes `NAME.k+1`, the file becomes
//!   `NAME.1` and a new file is opened. Renames only, through the directory descriptor.
//! - **Compression** (`--log-compress`) runs on a thread of its own: the writer hands over
//!   the rotated file's descriptor and goes on. The compressor writes `NAME.gz-<seq>`
//!   (`O_EXCL`), then, under the same lock as the renames, puts it where that file is *now*
//!   (`NAME.i.gz`, `i` = rotations since) and removes the plain `NAME.i`; a file rotated out
//!   of `--log-keep` meanwhile is not kept. Jobs wait in a bounded queue: when it is full a
//!   file stays uncompressed.
//! - **Reopen** (SIGUSR1): the file is opened again by name, for logrotate's default mode
//!   (rename, then signal).

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

/// `--log-keep` default. With `--log-max-size`'s default, 10M (rare rotations at normal log
/// rates, about 100k lines a file, and a file any editor opens), a log takes at most 60 MiB.
pub const DEFAULT_KEEP: usize = 5;
/// Smallest `--log-max-size` (1 KiB) but 0 (no rotation).
pub const MIN_MAX_SIZE: u64 = 1024;

/// What `--log-file` and its flags ask for.
#[derive(Debug, Clone)]
pub struct LogFileSpec {
    pub path: PathBuf,
    /// Rotate before the file passes this many bytes; 0: never (logrotate does it).
    pub max_size: u64,
    /// Rotated files kept (`NAME.1` … `NAME.keep`).
    pub keep: usize,
    /// gzip rotated files.
    pub compress: bool,
}

/// The log file, open, with what rotation needs.
pub struct LogFile {
    spec: LogFileSpec,
    dir: Arc<OwnedFd>,
    name: OsString,
    file: File,
    size: u64,
    /// Rotations done so far; the lock orders renames against the compressor's.
    rotations: Arc<Mutex<u64>>,
    compressor: Option<SyncSender<Job>>,
}

struct Job {
    file: File,
    seq: u64,
}

impl LogFile {
    /// Opens (creating, mode 0600) the file `spec.path` for appending.
    pub fn open(spec: LogFileSpec) -> Result<LogFile, String> {
        let shown = spec.path.display().to_string();
        let name = spec
            .path
            .file_name()
            .filter(|n| !n.is_empty() && *n != ".." && *n != ".")
            .ok_or_else(|| {
                format!("--log-file {shown}: not a file name; pass a path like /var/log/web.log")
            })?
            .to_os_string();
        let parent = match spec.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dir = rustix::fs::open(
            &parent,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            format!(
                "--log-file {shown}: cannot open its directory {}: {e}; create it first",
                parent.display()
            )
        })?;
        let file = open_in(&dir, &name).map_err(|e| format!("--log-file {shown}: {e}"))?;
        remove_leftovers(&dir, &name);
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let dir = Arc::new(dir);
        let rotations = Arc::new(Mutex::new(0));
        let compressor = if spec.compress {
            let (tx, rx) = sync_channel::<Job>(spec.keep.clamp(1, 16));
            let ctx = Ctx {
                dir: Arc::clone(&dir),
                name: name.clone(),
                keep: spec.keep,
                rotations: Arc::clone(&rotations),
            };
            std::thread::Builder::new()
                .name("herd-gzip".into())
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        ctx.compress(job);
                    }
                })
                .map_err(|e| format!("cannot start the thread that compresses logs: {e}"))?;
            Some(tx)
        } else {
            None
        };
        Ok(LogFile {
            spec,
            dir,
            name,
            file,
            size,
            rotations,
            compressor,
        })
    }

    pub fn path(&self) -> &Path {
        &self.spec.path
    }

    /// Writes `bytes` (whole lines), rotating first at a line boundary when they would
    /// pass `--log-max-size`. A rotation that fails is written into the file, which then
    /// keeps growing rather than losing lines.
    pub fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        let max = self.spec.max_size;
        while !bytes.is_empty() {
            if max == 0 || self.size + bytes.len() as u64 <= max {
                return self.append(bytes);
            }
            let room = usize::try_from(max.saturating_sub(self.size)).unwrap_or(usize::MAX);
            let cut = bytes[..room.min(bytes.len())]
                .iter()
                .rposition(|&b| b == b'\n')
                .map(|i| i + 1);
            let part = match cut {
                Some(cut) => cut,
                // A file with lines in it: rotate first. An empty one takes one line
                // whole, however long.
                None if self.size > 0 => 0,
                None => bytes
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(bytes.len(), |i| i + 1),
            };
            if part > 0 {
                self.append(&bytes[..part])?;
                bytes = &bytes[part..];
            }
            if !bytes.is_empty() {
                // Someone may have truncated it (copytruncate): look before rotating.
                self.size = self.file.metadata().map(|m| m.len()).unwrap_or(self.size);
                if self.size + bytes.len() as u64 > max && self.size > 0 {
                    if let Err(e) = self.rotate() {
                        let line = format!(
                            "herd: cannot rotate {}: {e}; the file keeps growing\n",
                            self.spec.path.display()
                        );
                        self.append(line.as_bytes())?;
                        return self.append(bytes);
                    }
                }
            }
        }
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut at = 0;
        while at < bytes.len() {
            match self.file.write(&bytes[at..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    at += n;
                    self.size += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Shifts the rotated files and starts a new one.
    fn rotate(&mut self) -> io::Result<()> {
        let keep = self.spec.keep;
        let seq = {
            let mut rotations = self.rotations.lock().unwrap_or_else(|e| e.into_inner());
            let names = Names::new(&self.name);
            for suffix in ["", ".gz"] {
                remove(&self.dir, &names.rotated(keep.max(1), suffix))?;
            }
            for k in (1..keep).rev() {
                for suffix in ["", ".gz"] {
                    rename(
                        &self.dir,
                        &names.rotated(k, suffix),
                        &names.rotated(k + 1, suffix),
                    )?;
                }
            }
            if keep == 0 {
                remove(&self.dir, &self.name)?;
            } else {
                rustix::fs::renameat(&*self.dir, &*self.name, &*self.dir, names.rotated(1, ""))?;
            }
            *rotations += 1;
            *rotations
        };
        let new = open_in(&self.dir, &self.name).map_err(io::Error::other)?;
        let old = std::mem::replace(&mut self.file, new);
        self.size = 0;
        if let (Some(tx), true) = (&self.compressor, keep > 0) {
            match tx.try_send(Job { file: old, seq }) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                // The compressor is behind: this file stays plain.
                Err(TrySendError::Full(_)) => {}
            }
        }
        Ok(())
    }

    /// Opens the file again by its name (after logrotate renamed it).
    pub fn reopen(&mut self) -> Result<(), String> {
        let file = open_in(&self.dir, &self.name)?;
        self.size = file.metadata().map(|m| m.len()).unwrap_or(0);
        self.file = file;
        Ok(())
    }
}

/// What the compressor needs to find the files.
struct Ctx {
    dir: Arc<OwnedFd>,
    name: OsString,
    keep: usize,
    rotations: Arc<Mutex<u64>>,
}

impl Ctx {
    fn compress(&self, job: Job) {
        let names = Names::new(&self.name);
        let tmp = names.with(&format!(".gz-{}", job.seq));
        let Ok(out) = rustix::fs::openat(
            &*self.dir,
            &tmp,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) else {
            return;
        };
        let mut gz = flate2::write::GzEncoder::new(File::from(out), flate2::Compression::default());
        let mut buf = vec![0u8; 64 << 10];
        let mut at = 0u64;
        let written = loop {
            match job.file.read_at(&mut buf, at) {
                Ok(0) => break gz.finish().and_then(|f| f.sync_all()),
                Ok(n) => {
                    if let Err(e) = gz.write_all(&buf[..n]) {
                        break Err(e);
                    }
                    at += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        let rotations = self.rotations.lock().unwrap_or_else(|e| e.into_inner());
        let index = usize::try_from(*rotations - job.seq + 1).unwrap_or(usize::MAX);
        if written.is_err() || index > self.keep {
            let _ = remove(&self.dir, &tmp);
            return;
        }
        if rustix::fs::renameat(&*self.dir, &tmp, &*self.dir, names.rotated(index, ".gz")).is_ok() {
            let _ = remove(&self.dir, &names.rotated(index, ""));
        } else {
            let _ = remove(&self.dir, &tmp);
        }
    }
}

/// The names next to the log file: `NAME.k`, `NAME.k.gz`.
struct Names<'a>(&'a OsString);

impl<'a> Names<'a> {
    fn new(name: &'a OsString) -> Self {
        Names(name)
    }

    fn with(&self, suffix: &str) -> OsString {
        let mut s = self.0.clone();
        s.push(suffix);
        s
    }

    fn rotated(&self, k: usize, suffix: &str) -> OsString {
        self.with(&format!(".{k}{suffix}"))
    }
}

/// Removes the compressor's unfinished `NAME.gz-SEQ` files that a herd which exited while
/// compressing left behind (an unlink never follows a link).
fn remove_leftovers(dir: &OwnedFd, name: &OsString) {
    let Ok(entries) = rustix::fs::Dir::read_from(dir) else {
        return;
    };
    let mut prefix = name.as_encoded_bytes().to_vec();
    prefix.extend_from_slice(b".gz-");
    for entry in entries.filter_map(Result::ok) {
        let file = entry.file_name().to_bytes();
        if file.starts_with(&prefix) && file[prefix.len()..].iter().all(u8::is_ascii_digit) {
            let _ = rustix::fs::unlinkat(dir, entry.file_name(), AtFlags::empty());
        }
    }
}

fn remove(dir: &OwnedFd, name: &OsString) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, name.as_os_str(), AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn rename(dir: &OwnedFd, from: &OsString, to: &OsString) -> io::Result<()> {
    match rustix::fs::renameat(dir, from.as_os_str(), dir, to.as_os_str()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Opens `name` in `dir` for appending, creating it 0600: never through a symlink, and
/// only a regular file of this user with one link.
pub fn open_in(dir: &OwnedFd, name: &OsString) -> Result<File, String> {
    use crate::paths::{open_private_at, PrivateOpenError};
    let not_regular = || "is not a regular file; herd writes logs to plain files only".to_string();
    // Read too: the compressor reads a rotated file through this descriptor.
    let (fd, st) = open_private_at(dir, name.as_os_str(), OFlags::RDWR | OFlags::APPEND)
        .map_err(|e| match e {
            PrivateOpenError::Open(rustix::io::Errno::LOOP) => {
                "is a symbolic link; herd will not follow it: remove it or pass the real path"
                    .to_string()
            }
            // A fifo without a reader (opened non-blocking), a socket.
            PrivateOpenError::Open(rustix::io::Errno::NXIO | rustix::io::Errno::OPNOTSUPP) => {
                not_regular()
            }
            PrivateOpenError::Open(e) | PrivateOpenError::Io(e) => format!("cannot open: {e}"),
            PrivateOpenError::NotOurs { regular: false, .. } => not_regular(),
            PrivateOpenError::NotOurs { uid, .. } => format!(
                "belongs to another user (uid {uid}); herd leaves it alone: remove it or pick another path"
            ),
        })?;
    if st.st_nlink > 1 {
        return Err("has other hard links; herd will not write through them: remove it".into());
    }
    Ok(File::from(fd))
}

/// Opens `path` for reading the way [`LogFile`] opens it for writing (for `herd logs`).
pub fn open_for_reading(path: &Path) -> io::Result<File> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = rustix::fs::open(
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let fd = rustix::fs::openat(
        &dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("herd-lf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[test]
    fn rotation_cuts_at_lines_and_keeps_k_files() {
        let d = dir("rot");
        let mut log = LogFile::open(LogFileSpec {
            path: d.join("a.log"),
            max_size: 1024,
            keep: 2,
            compress: false,
        })
        .expect("open");
        for i in 0..200 {
            log.write(format!("line {i:04} ................\n").as_bytes())
                .expect("write");
        }
        let mut names: Vec<String> = std::fs::read_dir(&d)
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a.log", "a.log.1", "a.log.2"]);
        for name in &names {
            let text = std::fs::read_to_string(d.join(name)).expect("read");
            assert!(text.len() <= 1024, "{name}: {}", text.len());
            assert!(text.ends_with('\n') && text.starts_with("line "), "{name}");
        }
        let last = std::fs::read_to_string(d.join("a.log")).expect("read");
        assert!(last.ends_with("line 0199 ................\n"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn rotated_files_are_gzipped_in_place() {
        let d = dir("gz");
        let mut log = LogFile::open(LogFileSpec {
            path: d.join("a.log"),
            max_size: 1024,
            keep: 3,
            compress: true,
        })
        .expect("open");
        for i in 0..60 {
            log.write(format!("line {i:04} ................\n").as_bytes())
                .expect("write");
        }
        let gz = d.join("a.log.1.gz");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !gz.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let raw = std::fs::read(&gz).expect("a.log.1.gz");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&raw[..]), &mut text)
            .expect("gunzip");
        assert!(
            text.starts_with("line 00") && text.ends_with("................\n"),
            "{text}"
        );
        assert!(!d.join("a.log.1").exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn links_fifos_and_hard_links_are_refused() {
        let d = dir("refuse");
        std::os::unix::fs::symlink("/etc/passwd", d.join("l.log")).expect("symlink");
        std::fs::write(d.join("x"), b"").expect("file");
        std::fs::hard_link(d.join("x"), d.join("h.log")).expect("link");
        rustix::fs::mkfifoat(rustix::fs::CWD, d.join("f.log"), Mode::from_raw_mode(0o600))
            .expect("fifo");
        for (name, why) in [
            ("l.log", "symbolic link"),
            ("h.log", "hard links"),
            ("f.log", "not a regular file"),
        ] {
            let err = LogFile::open(LogFileSpec {
                path: d.join(name),
                max_size: 0,
                keep: 1,
                compress: false,
            })
            .err()
            .expect(name);
            assert!(err.contains(why), "{name}: {err}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
