//! herd's stdout behind a bounded queue, written by a thread of its own.
//!
//! A stdout nobody drains (`herd run | less` paused, Ctrl-S on a terminal, a full pipe) must
//! not stop the supervisor: the runtime thread routes connections, answers `herd status` and
//! handles SIGTERM, so it never writes to stdout itself. It queues lines here, and the writer
//! thread is the only one that may block in write(2). The fd is left blocking: setting
//! O_NONBLOCK would change the file description herd shares with its parent shell or the
//! next process in a pipeline (workers have pipes of their own).
//!
//! The queue holds at most [`QUEUE_BYTES`] (lines being written included). When it is full:
//! - a worker line waits (its pump stops reading, so the worker blocks on its own pipe), as
//!   long as the writer is making progress: a slow reader loses nothing;
//! - once the writer has made no progress for [`STALL`], worker lines are dropped and counted
//!   instead, so no worker waits on a reader that is gone;
//! - herd's own events never wait: they may use [`EVENT_RESERVE`] more, then are dropped.
//!
//! Each run of dropped lines leaves one marker in the queue; when the writer reaches it, it
//! writes `herd: APP N log lines dropped (stdout was blocked)` (event `log_dropped` in JSON)
//! in their place. At exit [`Output::finish`] flushes for a bounded time, then gives up.
//!
//! With `--log-file` the same queue and thread write a [`LogFile`] instead of stdout. A
//! failed write (a full disk, an I/O error) loses that batch only: its lines are counted,
//! and `herd: APP N lines dropped: ERROR` goes into the file ahead of the next batch that
//! can be written, and into `herd logs` at once ([`Output::take_dropped`]). Routing never
//! waits on the file: a write that fails returns at once, and one that hangs stalls only
//! this thread (worker lines are then dropped as for a stalled stdout).

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::Notify;

use super::file::LogFile;
use super::line::{json_line, text_line};
use crate::spec::LogFormat;

/// Bytes of output herd holds for a stdout that does not keep up (1 MiB).
pub const QUEUE_BYTES: usize = 1 << 20;
/// Extra room for herd's own events when worker lines filled the queue.
const EVENT_RESERVE: usize = 256 << 10;
/// A write that has made no progress for this long means the reader is gone or paused.
pub const STALL: Duration = Duration::from_secs(2);
/// How long herd waits at exit for stdout to take what is queued.
pub const EXIT_FLUSH: Duration = Duration::from_secs(2);
/// Bytes per write(2), so progress is seen on a slow pipe.
const WRITE_CHUNK: usize = 16 << 10;
/// Bytes the writer takes from the queue at a time.
const BATCH: usize = 64 << 10;
/// How often a waiting pump looks again, in case a wake-up was missed.
const RECHECK: Duration = Duration::from_millis(50);

enum Item {
    Line(Vec<u8>),
    /// Lines dropped at this point of the stream.
    Dropped(u64),
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    /// Bytes queued or being written.
    bytes: usize,
    /// No more lines will come: the writer exits when the queue is empty.
    closed: bool,
    /// stdout failed (closed pipe): lines are thrown away from now on.
    broken: bool,
    /// SIGUSR1 asked for the log file to be opened again.
    reopen: bool,
    /// Lines the log file lost, and the last error, not yet told to `herd logs`.
    dropped: Option<(u64, String)>,
}

/// Where the writer thread writes.
pub enum Sink {
    Stdout,
    File(LogFile),
}

struct Shared {
    queue: Mutex<Queue>,
    /// The writer waits here for lines; [`Output::finish`] for the writer.
    changed: Condvar,
    /// Pumps wait here for room.
    room: Notify,
    epoch: Instant,
    /// When the writer last made progress (ms since `epoch`): took a batch or wrote bytes.
    progress_ms: AtomicU64,
    /// `Queue::dropped` holds something: read without the lock on every line.
    dropped_pending: AtomicBool,
    app: String,
    format: LogFormat,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn progressed(&self) {
        self.progress_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// One of herd's own lines, written by this thread (text or JSON `event`, with
    /// `fields` in JSON only).
    fn event_line(&self, event: &str, message: &str, fields: &[(&str, Value)]) -> Vec<u8> {
        let mut line = match self.format {
            LogFormat::Text => text_line(&format!("herd: {} {message}", self.app)).into_bytes(),
            LogFormat::Json => {
                let mut obj = Map::new();
                obj.insert("ts".into(), Value::String(super::timestamp()));
                obj.insert("app".into(), Value::String(self.app.clone()));
                obj.insert("event".into(), event.into());
                obj.insert("message".into(), Value::String(message.to_string()));
                for (key, value) in fields {
                    obj.insert((*key).to_string(), value.clone());
                }
                json_line(obj)
            }
        };
        line.push(b'\n');
        line
    }

    /// What stands in the log file for `n` lines a failed write lost.
    fn file_notice(&self, n: u64, error: &str) -> Vec<u8> {
        self.event_line("log_dropped", &format!("{n} lines dropped: {error}"), &[])
    }

    /// What stands for `n` dropped lines in the output.
    fn notice(&self, n: u64) -> Vec<u8> {
        let message = format!("{n} log lines dropped (stdout was blocked)");
        self.event_line("log_dropped", &message, &[("lines", n.into())])
    }
}

/// The queue in front of herd's stdout. Cheap to clone; the writer thread holds one too.
#[derive(Clone)]
pub struct Output {
    shared: Arc<Shared>,
}

impl Output {
    /// Starts the writer thread.
    pub fn start(app: &str, format: LogFormat, sink: Sink) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::default(),
            changed: Condvar::new(),
            room: Notify::new(),
            epoch: Instant::now(),
            progress_ms: AtomicU64::new(0),
            dropped_pending: AtomicBool::new(false),
            app: app.to_string(),
            format,
        });
        let writer = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("herd-stdout".into())
            .spawn(move || write_loop(&writer, sink))?;
        Ok(Output { shared })
    }

    /// An output that throws every line away, without a writer thread (unit tests).
    #[cfg(test)]
    pub fn discard(app: &str, format: LogFormat) -> Self {
        let queue = Queue {
            broken: true,
            ..Queue::default()
        };
        Output {
            shared: Arc::new(Shared {
                queue: Mutex::new(queue),
                changed: Condvar::new(),
                room: Notify::new(),
                epoch: Instant::now(),
                progress_ms: AtomicU64::new(0),
                dropped_pending: AtomicBool::new(false),
                app: app.to_string(),
                format,
            }),
        }
    }

    /// Queues `line` (newline included) if it fits under `limit`; gives it back if not.
    fn try_push(&self, line: Vec<u8>, limit: usize) -> Result<(), Vec<u8>> {
        let mut q = self.shared.lock();
        if q.broken {
            return Ok(());
        }
        if q.bytes + line.len() > limit && q.bytes > 0 {
            return Err(line);
        }
        if q.bytes == 0 {
            // The writer was idle: the stall clock starts now, not at its last write.
            self.shared.progressed();
        }
        q.bytes += line.len();
        q.items.push_back(Item::Line(line));
        drop(q);
        self.shared.changed.notify_all();
        Ok(())
    }

    fn count_drop(&self) {
        let mut q = self.shared.lock();
        if q.broken {
            return;
        }
        match q.items.back_mut() {
            Some(Item::Dropped(n)) => *n += 1,
            _ => q.items.push_back(Item::Dropped(1)),
        }
    }

    fn stalled(&self) -> bool {
        let last = self.shared.progress_ms.load(Ordering::Relaxed);
        self.shared.now_ms().saturating_sub(last) > STALL.as_millis() as u64
    }

    /// One of herd's own lines: queued or, with the queue full, dropped. Never waits.
    pub fn event(&self, line: Vec<u8>) {
        if self.try_push(line, QUEUE_BYTES + EVENT_RESERVE).is_err() {
            self.count_drop();
        }
    }

    /// A worker's line: waits for room while stdout drains, dropped once it has stalled.
    pub async fn line(&self, line: Vec<u8>) {
        let mut line = match self.try_push(line, QUEUE_BYTES) {
            Ok(()) => return,
            Err(back) => back,
        };
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_push(line, QUEUE_BYTES) {
                Ok(()) => return,
                Err(back) => line = back,
            }
            if self.stalled() {
                self.count_drop();
                return;
            }
            let _ = tokio::time::timeout(RECHECK, room).await;
        }
    }

    /// Asks the writer to open the log file again by its name (SIGUSR1). Never waits.
    pub fn reopen(&self) {
        self.shared.lock().reopen = true;
        self.shared.changed.notify_all();
    }

    /// Lines the log file lost since the last call, with the last error.
    pub fn take_dropped(&self) -> Option<(u64, String)> {
        // Almost always nothing: no lock on the way of every worker line.
        if !self.shared.dropped_pending.swap(false, Ordering::Acquire) {
            return None;
        }
        self.shared.lock().dropped.take()
    }

    /// Lets the writer finish what is queued, waiting at most `bound`, and not at all for a
    /// stdout that has already stalled: a blocked stdout must not keep herd from exiting.
    pub fn finish(&self, bound: Duration) {
        let deadline = Instant::now() + bound;
        let mut q = self.shared.lock();
        q.closed = true;
        self.shared.changed.notify_all();
        while !(q.broken || q.bytes == 0 && q.items.is_empty()) {
            let now = Instant::now();
            if now >= deadline || self.stalled() {
                return;
            }
            q = self
                .shared
                .changed
                .wait_timeout(q, (deadline - now).min(RECHECK))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

fn write_loop(shared: &Shared, mut sink: Sink) {
    let mut buf: Vec<u8> = Vec::with_capacity(BATCH);
    // Lines the file lost that it has not been told about yet, and why.
    let mut lost: Option<(u64, String)> = None;
    loop {
        let mut taken = 0;
        let mut lines = 0u64;
        let reopen;
        {
            let mut q = shared.lock();
            while q.items.is_empty() && !q.reopen {
                if q.closed {
                    return;
                }
                q = shared.changed.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            reopen = std::mem::take(&mut q.reopen);
            // Taking a batch counts as progress: the stall clock starts at this write.
            shared.progressed();
            buf.clear();
            if let (Sink::File(_), Some((n, error))) = (&sink, &lost) {
                buf.extend_from_slice(&shared.file_notice(*n, error));
            }
            while let Some(item) = q.items.pop_front() {
                match item {
                    Item::Line(line) => {
                        buf.extend_from_slice(&line);
                        taken += line.len();
                    }
                    Item::Dropped(n) => buf.extend_from_slice(&shared.notice(n)),
                }
                lines += 1;
                if buf.len() >= BATCH {
                    break;
                }
            }
        }
        let ok = match &mut sink {
            Sink::Stdout => write_all(shared, &buf),
            Sink::File(file) => {
                if reopen {
                    let line = match file.reopen() {
                        Ok(()) => format!("reopened {} (SIGUSR1)", file.path().display()),
                        Err(e) => format!(
                            "cannot reopen {}: {e}; still writing the old file",
                            file.path().display()
                        ),
                    };
                    let mut line = shared.event_line("log_reopened", &line, &[]);
                    line.extend_from_slice(&buf);
                    buf = line;
                }
                match file.write(&buf) {
                    Ok(()) => lost = None,
                    Err(e) => {
                        let error = e.to_string();
                        let n = lost.as_ref().map_or(0, |l| l.0) + lines;
                        lost = Some((n, error.clone()));
                        let mut q = shared.lock();
                        let told = q.dropped.as_ref().map_or(0, |d| d.0);
                        q.dropped = Some((told + lines, error));
                        shared.dropped_pending.store(true, Ordering::Release);
                    }
                }
                shared.progressed();
                true
            }
        };
        let mut q = shared.lock();
        q.bytes -= taken;
        if !ok {
            // `herd run | head`: nobody will read again. Keep running, write nothing.
            q.broken = true;
            q.items.clear();
            q.bytes = 0;
        }
        drop(q);
        if buf.capacity() > 4 * BATCH {
            buf = Vec::with_capacity(BATCH);
        }
        shared.room.notify_waiters();
        shared.changed.notify_all();
    }
}

/// Writes everything to fd 1; false once nobody can read it again (a closed pipe, no fd).
/// Other errors (a full disk under `herd start`'s log file) lose this batch only.
fn write_all(shared: &Shared, mut bytes: &[u8]) -> bool {
    use rustix::io::Errno;
    let stdout = std::io::stdout();
    let fd = stdout.as_fd();
    while !bytes.is_empty() {
        let chunk = &bytes[..bytes.len().min(WRITE_CHUNK)];
        match rustix::io::write(fd, chunk) {
            Ok(0) => return true,
            Ok(n) => {
                bytes = &bytes[n..];
                shared.progressed();
            }
            Err(Errno::INTR) => {}
            // Someone else made the shared file description non-blocking.
            Err(Errno::AGAIN) => std::thread::sleep(Duration::from_millis(10)),
            Err(Errno::PIPE | Errno::BADF) => return false,
            Err(_) => return true,
        }
    }
    true
}
