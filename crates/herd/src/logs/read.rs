//! `herd logs` without a supervisor: the app's log file, read from its end.
//!
//! - The last N lines are found by reading backwards in 64 KiB blocks until N line ends are
//!   seen, so a log of gigabytes costs what its last lines cost. When the file has fewer
//!   than N lines (it was just rotated), the rest comes from `NAME.1` if it is not
//!   compressed.
//! - `-f` polls (every [`POLL`]) like `tail -F`: new bytes are printed as whole lines; when
//!   the name now points to another file (rotated, by herd or logrotate), the old one is
//!   read to its end and the new one from its start; a file that shrank (copytruncate) is
//!   read again from its start. An unfinished line waits, at most [`MAX_PENDING`] bytes.
//!
//! Every line is shown through [`super::line::sanitize`], like every line herd prints.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use super::file::open_for_reading;
use super::line::sanitize;

/// How often `-f` looks at the file.
pub const POLL: Duration = Duration::from_millis(200);
/// Bytes of an unfinished line `-f` holds before printing it as it is.
const MAX_PENDING: usize = 1 << 20;
const BLOCK: u64 = 64 << 10;

/// Which lines to show: all, or one instance's (`app[N]` in text, `"instance":N` in JSON).
#[derive(Debug, Clone)]
pub struct Filter {
    instance: Option<usize>,
    /// `app[N] `, the text prefix of the instance's lines (built once, not per line).
    tag: String,
}

impl Filter {
    pub fn new(app: &str, instance: Option<usize>) -> Filter {
        let tag = instance.map_or_else(String::new, |i| format!("{app}[{i}] "));
        Filter { instance, tag }
    }

    pub fn keeps(&self, line: &str) -> bool {
        let Some(instance) = self.instance else {
            return true;
        };
        if line.starts_with('{') {
            return serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("instance").and_then(serde_json::Value::as_u64))
                == Some(instance as u64);
        }
        line.starts_with(&self.tag)
            || line
                .strip_prefix("herd: ")
                .is_some_and(|l| l.starts_with(&self.tag))
    }
}

/// The last `n` lines of `file` that `filter` keeps, reading backwards from its end.
pub fn last_lines(file: &File, n: usize, filter: &Filter) -> io::Result<Vec<String>> {
    let len = file.metadata()?.len();
    let mut end = len;
    let mut tail: Vec<u8> = Vec::new();
    let mut kept: Vec<String> = Vec::new();
    // Lines are taken from the back of `tail` as they complete.
    while kept.len() < n && end > 0 {
        let start = end.saturating_sub(BLOCK);
        let mut block = vec![0u8; (end - start) as usize];
        file.read_exact_at(&mut block, start)?;
        block.extend_from_slice(&tail);
        tail = block;
        end = start;
        // Every line after the first newline in `tail` is whole (or the file's start is
        // reached and the first one is too).
        while kept.len() < n {
            let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
            let cut = match body.iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                None if end == 0 && !body.is_empty() => 0,
                None => break,
            };
            let line = String::from_utf8_lossy(&body[cut..]).into_owned();
            if filter.keeps(&line) {
                kept.push(line);
            }
            tail.truncate(cut);
            if cut == 0 {
                break;
            }
        }
    }
    kept.reverse();
    Ok(kept)
}

/// Prints the last `n` lines of the log at `path` (and, with `follow`, every line written
/// after them, across rotations, until stdout closes). A closed stdout ends it with `Ok`.
pub fn print(path: &Path, n: usize, follow: bool, filter: &Filter) -> io::Result<()> {
    let file = open_for_reading(path)?;
    let mut lines = last_lines(&file, n, filter)?;
    if lines.len() < n {
        let mut older = path.as_os_str().to_os_string();
        older.push(".1");
        if let Ok(old) = open_for_reading(Path::new(&older)) {
            let mut more = last_lines(&old, n - lines.len(), filter)?;
            more.append(&mut lines);
            lines = more;
        }
    }
    let stdout = io::stdout();
    let mut out = stdout.lock();
    for line in &lines {
        if writeln!(out, "{}", sanitize(line)).is_err() {
            return Ok(());
        }
    }
    if out.flush().is_err() || !follow {
        return Ok(());
    }
    let mut at = file.metadata()?.len();
    let mut file = file;
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; BLOCK as usize];
    loop {
        // Everything the current file has.
        let len = file.metadata()?.len();
        if len < at {
            at = 0; // truncated in place
        }
        loop {
            let got = match file.read_at(&mut buf, at) {
                Ok(0) => break,
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            at += got as u64;
            pending.extend_from_slice(&buf[..got]);
            if !emit(&mut out, &mut pending, filter) {
                return Ok(());
            }
        }
        // A new file under the name: this one is finished (read above), go on there.
        if let Ok(now) = open_for_reading(path) {
            let (a, b) = (now.metadata()?, file.metadata()?);
            if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
                file = now;
                at = 0;
                continue;
            }
        }
        std::thread::sleep(POLL);
    }
}

/// Prints the whole lines in `pending`; false once stdout is closed.
fn emit(out: &mut impl Write, pending: &mut Vec<u8>, filter: &Filter) -> bool {
    let end = match pending.iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        None if pending.len() > MAX_PENDING => pending.len(),
        None => return true,
    };
    for line in pending[..end].split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        let line = String::from_utf8_lossy(line);
        if filter.keeps(&line) && writeln!(out, "{}", sanitize(&line)).is_err() {
            return false;
        }
    }
    pending.drain(..end);
    out.flush().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_read_backwards_across_blocks() {
        let dir = std::env::temp_dir().join(format!("herd-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("a.log");
        let long = "y".repeat(70_000);
        let mut text = String::new();
        for i in 0..5000 {
            text.push_str(&format!("a[{}] 1 | line {i}\n", i % 2));
        }
        text.push_str(&format!("a[0] 1 | {long}\n"));
        text.push_str("herd: a[1] pid 2 exited\n");
        std::fs::write(&path, &text).expect("write");
        let file = File::open(&path).expect("open");
        let all = Filter::new("a", None);
        let got = last_lines(&file, 3, &all).expect("tail");
        assert_eq!(got[0], "a[1] 1 | line 4999");
        assert_eq!(got[1].len(), 9 + 70_000);
        assert_eq!(got[2], "herd: a[1] pid 2 exited");
        let one = Filter::new("a", Some(1));
        let got = last_lines(&file, 2, &one).expect("tail");
        assert_eq!(got, ["a[1] 1 | line 4999", "herd: a[1] pid 2 exited"]);
        assert_eq!(last_lines(&file, 100_000, &all).expect("all").len(), 5002);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
