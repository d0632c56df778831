//! The control socket: how `herd status`, `reload`, `scale`, `logs`, … reach a running
//! supervisor.
//!
//! Each supervisor listens on `HERD_HOME/<name>.sock`, a unix stream socket that is 0600 in a
//! 0700 directory, and also checks each client's uid with `SO_PEERCRED`: only the user that
//! runs herd (or root) may talk to it. A client sends one request line and reads one response
//! line ([`herd_proto::control`]); `logs -f` keeps reading.
//!
//! The socket file is also the app's registration: `herd ls` lists the sockets in
//! `HERD_HOME`. The name itself is held by a lock, `HERD_HOME/<name>.lock`, that the
//! supervisor keeps `flock`ed for its whole life (and removes, still locked, on its way
//! out): two supervisors of one name are settled by the lock, never by looking at the
//! socket, and only the lock holder ever removes a stale socket (a socket of ours that
//! refuses connections). Clients never remove anything.
//!
//! What a client can make the supervisor hold is bounded: [`MAX_CLIENTS`] connections (more
//! are told "busy" and closed), one request line of at most [`MAX_REQUEST`] bytes that must
//! arrive within [`REQUEST_TIMEOUT`], and for `herd logs` at most [`HISTORY_BUDGET`] bytes of
//! history for all slow readers together; `logs -f` skips lines a reader is too slow for.

use std::cell::Cell;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context;
use herd_proto::control::{
    frame, parse_request, Frame, LogLine, Request, RequestError, Response, MAX_REQUEST,
};
use herd_proto::event::EventName;
use rustix::fs::{FileType, OFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast::error::RecvError, mpsc::UnboundedSender, oneshot};

use crate::logs::Logger;
use crate::paths::{AppName, Home};
use crate::vocab::Event;

/// Control connections of the owner (or root) served at once; more are told "busy".
pub const MAX_CLIENTS: usize = 32;
/// Connections of other uids being told "permission denied" at once; they have their own
/// slots, so another user cannot take the owner's.
const MAX_REFUSED: usize = 4;
/// How long a client may take to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of log history that the answers to all `herd logs` clients may hold at once while
/// their readers catch up; a request that finds it spent gets the newest lines that fit.
pub const HISTORY_BUDGET: usize = 8 << 20;
/// What one history line costs besides its text (its `LogLine`).
const LINE_COST: usize = 48;
/// History is serialised and written in pieces of about this size.
const CHUNK: usize = 64 * 1024;
/// The pause after a failed accept (out of descriptors or memory) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long a second supervisor of a name waits for the first to finish exiting.
const LOCK_WAIT: Duration = Duration::from_secs(5);
/// How long a client waits for a supervisor whose connection queue is full.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A running supervisor's hold on its name: the locked `<name>.lock` (keep it until the
/// process ends) and the bound control socket.
pub struct Registration {
    pub listener: std::os::unix::net::UnixListener,
    pub lock: NameLock,
    /// The socket, reached through `HERD_HOME`'s descriptor (valid while `home` is open).
    pub socket: PathBuf,
}

/// Takes the name (its lock), removes a stale socket of a dead supervisor and binds the
/// control socket; refuses when another supervisor holds the name.
pub fn register(home: &Home, name: &AppName) -> anyhow::Result<Registration> {
    let lock = take_lock(home, name)?;
    // Who holds it, for the message a second supervisor gets.
    let _ = lock.file.set_len(0);
    let _ = lock
        .file
        .write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0);

    let sock = name.file("sock");
    remove_stale(home, name)?;
    let socket = home.entry(&sock);
    let listener = std::os::unix::net::UnixListener::bind(&socket).with_context(|| {
        format!(
            "cannot create control socket {}",
            home.display(&sock).display()
        )
    })?;
    // The socket is ours and new, in a directory only we can write: no link to follow.
    rustix::fs::chmodat(
        home.fd(),
        sock.as_str(),
        rustix::fs::Mode::from_raw_mode(0o600),
        rustix::fs::AtFlags::empty(),
    )
    .with_context(|| format!("cannot chmod {}", home.display(&sock).display()))?;
    listener.set_nonblocking(true)?;
    Ok(Registration {
        listener,
        lock,
        socket,
    })
}

/// The `flock` on `HERD_HOME/<name>.lock` that makes a supervisor the owner of a name. The
/// file is removed (while still locked) when the supervisor is done; whoever then gets the
/// lock on the removed file sees that it is no longer the one at the path and takes the
/// new one, so the lock and the path always agree.
pub struct NameLock {
    file: std::fs::File,
    dir: std::os::fd::OwnedFd,
    path: String,
}

impl Drop for NameLock {
    fn drop(&mut self) {
        if holds_path(&self.dir, &self.path, &self.file) {
            let _ =
                rustix::fs::unlinkat(&self.dir, self.path.as_str(), rustix::fs::AtFlags::empty());
        }
    }
}

/// Whether `file` is (still) the file at `dir/path`.
fn holds_path(dir: &impl std::os::fd::AsFd, path: &str, file: &std::fs::File) -> bool {
    let at = rustix::fs::statat(dir, path, rustix::fs::AtFlags::SYMLINK_NOFOLLOW);
    match (at, rustix::fs::fstat(file)) {
        (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
        _ => false,
    }
}

/// `flock`s the name's lock file. A holder that answers on the socket is a running app; one
/// that does not may be exiting (after `herd stop` answered) or starting, so it gets
/// [`LOCK_WAIT`] to finish.
fn take_lock(home: &Home, name: &AppName) -> anyhow::Result<NameLock> {
    use rustix::fs::FlockOperation;
    let path = name.file("lock");
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        let file = home.open_private_file(&path, OFlags::RDWR)?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) if holds_path(&home.fd(), &path, &file) => {
                let dir = home
                    .try_clone_fd()
                    .with_context(|| format!("{}", home.path().display()))?;
                return Ok(NameLock { file, dir, path });
            }
            // The previous holder removed it on its way out: take the new one.
            Ok(()) => continue,
            Err(rustix::io::Errno::WOULDBLOCK | rustix::io::Errno::INTR) => {}
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "cannot lock {}: {e}",
                    home.display(&path).display()
                ))
            }
        }
        let answers = matches!(probe(&home.entry(&name.file("sock"))), Probe::Answers);
        if answers || Instant::now() >= deadline {
            let mut text = String::new();
            let mut buf = [0u8; 32];
            if let Ok(n) = file.read_at(&mut buf, 0) {
                text = String::from_utf8_lossy(&buf[..n]).trim().to_string();
            }
            let holder = if text.is_empty() {
                String::new()
            } else {
                format!("supervisor pid {text}, ")
            };
            let state = if answers {
                String::new()
            } else {
                format!(
                    "; it holds {} but does not answer on its control socket",
                    home.display(&path).display()
                )
            };
            return Err(anyhow::anyhow!(
                "an app named `{name}` is already running ({holder}control socket {}){state}; stop it with `herd stop {name}` or pass another --name",
                home.display(&name.file("sock")).display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes `<name>.sock` if it is a dead supervisor's: a socket (not a link, not a file) of
/// ours that refuses connections. Called with the name's lock held, so no live supervisor
/// of this herd can be binding it meanwhile.
fn remove_stale(home: &Home, name: &AppName) -> anyhow::Result<()> {
    let sock = name.file("sock");
    let shown = home.display(&sock);
    let me = rustix::process::geteuid().as_raw();
    match home.lstat(&sock) {
        Ok(None) => Ok(()),
        Ok(Some((FileType::Socket, uid))) if uid == me => match probe(&home.entry(&sock)) {
            Probe::Refused => home
                .unlink(&sock)
                .with_context(|| format!("cannot remove the stale socket {}", shown.display())),
            Probe::Absent => Ok(()),
            Probe::Answers => Err(anyhow::anyhow!(
                "an app named `{name}` is already running (control socket {}); stop it with `herd stop {name}` or pass another --name",
                shown.display()
            )),
            Probe::Failed(e) => {
                Err(anyhow::Error::new(e).context(format!("cannot check {}", shown.display())))
            }
        },
        Ok(Some(_)) => Err(anyhow::anyhow!(
            "{} is not a control socket of yours; herd leaves it alone: remove it or pass another --name",
            shown.display()
        )),
        Err(e) => Err(anyhow::Error::new(e).context(shown.display().to_string())),
    }
}

enum Probe {
    /// Someone accepts (or will: its queue is full).
    Answers,
    /// A socket nobody listens on.
    Refused,
    Absent,
    Failed(std::io::Error),
}

/// Knocks on a unix socket without blocking (a full queue counts as an answer).
fn probe(path: &Path) -> Probe {
    use socket2::{Domain, SockAddr, Socket, Type};
    let attempt = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None)
        .and_then(|s| SockAddr::unix(path).map(|a| (s, a)))
        .and_then(|(s, addr)| s.connect(&addr));
    match attempt {
        Ok(()) => Probe::Answers,
        Err(e) => match e.kind() {
            std::io::ErrorKind::WouldBlock => Probe::Answers,
            std::io::ErrorKind::ConnectionRefused => Probe::Refused,
            std::io::ErrorKind::NotFound => Probe::Absent,
            _ => Probe::Failed(e),
        },
    }
}

/// A share of a bounded count, given back when dropped.
struct Held {
    pool: Rc<Cell<usize>>,
    n: usize,
}

impl Held {
    /// `n` more, if that stays within `max`.
    fn take(pool: &Rc<Cell<usize>>, n: usize, max: usize) -> Option<Held> {
        let now = pool.get();
        (now + n <= max).then(|| {
            pool.set(now + n);
            Held {
                pool: pool.clone(),
                n,
            }
        })
    }

    fn release(&mut self, n: usize) {
        let n = n.min(self.n);
        self.n -= n;
        self.pool.set(self.pool.get() - n);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let n = self.n;
        self.release(n);
    }
}

#[derive(Default)]
struct Limits {
    clients: Rc<Cell<usize>>,
    refused: Rc<Cell<usize>>,
    history: Rc<Cell<usize>>,
}

/// Accepts control clients until the task is dropped.
pub async fn serve(listener: UnixListener, tx: UnboundedSender<Event>, logger: Logger) {
    let limits = Limits::default();
    let our_uid = rustix::process::geteuid().as_raw();
    let mut failing = false;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors (EMFILE, ENFILE) or memory: the connection stays queued
                // and accept would fail again at once. Wait instead of spinning; say so once
                // per burst.
                if !failing {
                    failing = true;
                    logger.event(
                        EventName::ControlError,
                        None,
                        &format!("cannot accept control clients ({e}); retrying every 100ms"),
                        &[],
                    );
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        failing = false;
        let allowed = stream
            .peer_cred()
            .is_ok_and(|cred| peer_allowed(cred.uid(), our_uid));
        let (pool, max) = if allowed {
            (&limits.clients, MAX_CLIENTS)
        } else {
            (&limits.refused, MAX_REFUSED)
        };
        let Some(slot) = Held::take(pool, 1, max) else {
            // A fresh socket's buffer has room: this never blocks.
            let busy = Response::error(format!(
                "herd is busy: {max} control connections are open already; close some and try again"
            ));
            let mut text = serde_json::to_vec(&busy).unwrap_or_default();
            text.push(b'\n');
            let _ = stream.try_write(&text);
            continue;
        };
        tokio::task::spawn_local(client(
            stream,
            allowed,
            slot,
            limits.history.clone(),
            tx.clone(),
            logger.clone(),
        ));
    }
}

/// Only the owner (or root) may control the app.
pub fn peer_allowed(peer_uid: u32, our_uid: u32) -> bool {
    peer_uid == our_uid || peer_uid == 0
}

/// Reads the request line: `None` when the client hung up without sending anything. At
/// most [`MAX_REQUEST`] bytes are kept.
async fn read_request(
    read: &mut OwnedReadHalf,
) -> std::io::Result<Result<Option<Vec<u8>>, RequestError>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = read.read(&mut chunk).await?;
        let eof = n == 0;
        let room = MAX_REQUEST - buf.len();
        buf.extend_from_slice(&chunk[..n.min(room)]);
        if !(eof || buf.len() >= MAX_REQUEST || chunk[..n].contains(&b'\n')) {
            continue;
        }
        match frame(&buf, eof) {
            Frame::Incomplete => {}
            Frame::TooLong => return Ok(Err(RequestError::TooLong)),
            Frame::Line(line) if eof && line.is_empty() => return Ok(Ok(None)),
            Frame::Line(line) => {
                let len = line.len();
                buf.truncate(len);
                return Ok(Ok(Some(buf)));
            }
        }
    }
}

async fn client(
    stream: UnixStream,
    allowed: bool,
    _slot: Held,
    history: Rc<Cell<usize>>,
    tx: UnboundedSender<Event>,
    logger: Logger,
) {
    let (mut read, mut write) = stream.into_split();
    // The request is read even from a refused client (bounded), so that it is still reading
    // when the refusal comes and sees the reason rather than a broken pipe.
    let line = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut read)).await;
    if !allowed {
        let _ = reply(
            &mut write,
            &Response::error("permission denied: this app belongs to another user"),
        )
        .await;
        return;
    }
    let parsed = match line {
        Err(_) => Err(format!(
            "bad request: nothing complete received within {}s; send one JSON object per line",
            REQUEST_TIMEOUT.as_secs()
        )),
        Ok(Err(_)) | Ok(Ok(Ok(None))) => return,
        Ok(Ok(Err(e))) => Err(e.to_string()),
        Ok(Ok(Ok(Some(line)))) => parse_request(&line).map_err(|e| e.to_string()),
    };
    let request = match parsed {
        Ok(request) => request,
        Err(message) => {
            let _ = reply(&mut write, &Response::error(message)).await;
            return;
        }
    };
    if let Request::Logs {
        lines,
        follow,
        instance,
    } = request
    {
        return logs(read, write, &logger, &history, lines, follow, instance).await;
    }
    let (done, wait) = oneshot::channel();
    if tx
        .send(Event::Control {
            request,
            reply: done,
        })
        .is_err()
    {
        let _ = reply(
            &mut write,
            &Response::error("the supervisor is shutting down"),
        )
        .await;
        return;
    }
    let response = wait
        .await
        .unwrap_or_else(|_| Response::error("the supervisor stopped before answering"));
    let _ = reply(&mut write, &response).await;
}

/// `herd logs`: the recent lines (as much of them as the history budget allows), then with
/// `follow` every new line until the client hangs up.
async fn logs(
    mut read: OwnedReadHalf,
    mut write: OwnedWriteHalf,
    logger: &Logger,
    history: &Rc<Cell<usize>>,
    lines: usize,
    follow: bool,
    instance: Option<usize>,
) {
    let (mut recent, mut rx) = logger.recent(lines, instance);
    let room = HISTORY_BUDGET.saturating_sub(history.get());
    let mut cost = 0;
    let mut keep = 0;
    for line in recent.iter().rev() {
        let c = line.text.len() + LINE_COST;
        if cost + c > room {
            break;
        }
        cost += c;
        keep += 1;
    }
    let left_out = recent.len() - keep;
    // Dropped here, not held while a slow reader takes its time.
    recent.drain(..left_out);
    recent.shrink_to_fit();
    // Within the budget by construction (`cost <= room`).
    let mut hold = Held::take(history, cost, HISTORY_BUDGET).unwrap_or(Held {
        pool: history.clone(),
        n: 0,
    });
    if write_history(&mut write, left_out, recent, &mut hold)
        .await
        .is_err()
        || !follow
    {
        return;
    }
    drop(hold);
    let mut probe = [0u8; 256];
    loop {
        let received = tokio::select! {
            r = rx.recv() => r,
            // Nothing more is expected from the client: data is dropped, and its hang-up
            // ends the stream (and frees its slot) even when the app is quiet.
            n = read.read(&mut probe) => match n {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            },
        };
        let line = match received {
            Ok(line) if instance.is_none() || line.instance == instance => line,
            Ok(_) => continue,
            // The channel is bounded: a reader too slow for the app loses lines, told how
            // many, and herd holds nothing more for it.
            Err(RecvError::Lagged(n)) => LogLine {
                instance: None,
                text: format!("herd: … {n} lines skipped (reader too slow)"),
            },
            Err(RecvError::Closed) => return,
        };
        let mut text = serde_json::to_vec(&line).unwrap_or_default();
        text.push(b'\n');
        if write.write_all(&text).await.is_err() {
            return;
        }
    }
}

/// Writes `{"ok":true,"lines":[…]}` a piece at a time, so that a slow reader holds its
/// history (counted in `hold`) and one piece, not a serialised copy of everything.
async fn write_history(
    write: &mut OwnedWriteHalf,
    left_out: usize,
    recent: Vec<LogLine>,
    hold: &mut Held,
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(CHUNK + 1024);
    out.extend_from_slice(br#"{"ok":true,"lines":["#);
    let mut first = true;
    let marker = (left_out > 0).then(|| LogLine {
        instance: None,
        text: format!(
            "herd: … {left_out} earlier lines left out (other `herd logs` readers are still reading)"
        ),
    });
    for line in marker.into_iter().chain(recent) {
        if !first {
            out.push(b',');
        }
        first = false;
        serde_json::to_writer(&mut out, &line).map_err(std::io::Error::other)?;
        hold.release(line.text.len() + LINE_COST);
        drop(line);
        if out.len() >= CHUNK {
            write.write_all(&out).await?;
            out.clear();
        }
    }
    out.extend_from_slice(b"]}\n");
    write.write_all(&out).await
}

async fn reply(write: &mut OwnedWriteHalf, response: &Response) -> std::io::Result<()> {
    let mut text = serde_json::to_vec(response).unwrap_or_default();
    text.push(b'\n');
    write.write_all(&text).await
}

/// The client side: one request, one response (blocking; the CLI needs no runtime).
pub struct Client {
    reader: BufReader<StdUnixStream>,
}

/// Why a command got no answer. The io or JSON error is kept as the source, not in the
/// message: shown with `{:#}` (as `main` does) it reads `CONTEXT: CAUSE`.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no app named `{0}` is running (see `herd ls`)")]
    NotRunning(String),
    /// Creating or connecting the socket failed (path shown).
    #[error("{}", .path.display())]
    Connect {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{}: the supervisor accepts no connections (busy or stuck for {}s)",
        .path.display(),
        CONNECT_TIMEOUT.as_secs()
    )]
    Busy { path: std::path::PathBuf },
    #[error("encoding the request")]
    Encode(#[source] serde_json::Error),
    #[error("setting the read timeout")]
    Timeout(#[source] std::io::Error),
    #[error("sending the request")]
    Send(#[source] std::io::Error),
    #[error("the supervisor closed the connection without answering")]
    NoAnswer,
    #[error("unreadable answer")]
    Unreadable(#[source] serde_json::Error),
    #[error("waiting for the answer")]
    Receive(#[source] std::io::Error),
}

impl Client {
    /// Connects to the app's socket. Nothing is ever removed here: a socket nobody answers
    /// on is left to the next supervisor of that name, which holds the name's lock.
    pub fn connect(home: &Home, name: &AppName) -> Result<Self, ClientError> {
        use socket2::{Domain, SockAddr, Socket, Type};
        let file = name.file("sock");
        let shown = home.display(&file);
        let io = |source: std::io::Error| ClientError::Connect {
            path: shown.clone(),
            source,
        };
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(io)?;
        // Bounds the wait when the supervisor's queue is full.
        socket
            .set_write_timeout(Some(CONNECT_TIMEOUT))
            .map_err(io)?;
        let addr = SockAddr::unix(home.entry(&file)).map_err(io)?;
        match socket.connect(&addr) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Err(ClientError::NotRunning(name.to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(ClientError::Busy { path: shown })
            }
            Err(e) => return Err(io(e)),
        }
        socket.set_write_timeout(None).map_err(io)?;
        Ok(Client {
            reader: BufReader::new(socket.into()),
        })
    }

    pub fn request(
        &mut self,
        request: &Request,
        timeout: Option<Duration>,
    ) -> Result<Response, ClientError> {
        let mut text = serde_json::to_vec(request).map_err(ClientError::Encode)?;
        text.push(b'\n');
        let stream = self.reader.get_mut();
        stream
            .set_read_timeout(timeout)
            .map_err(ClientError::Timeout)?;
        if let Err(e) = stream.write_all(&text) {
            // A supervisor that refuses (busy, another user) may answer and close before
            // reading: its answer says more than the broken pipe.
            return self.read_response().map_err(|_| ClientError::Send(e));
        }
        self.read_response()
    }

    pub fn read_response(&mut self) -> Result<Response, ClientError> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(ClientError::NoAnswer),
            Ok(_) => serde_json::from_str(&line).map_err(ClientError::Unreadable),
            Err(e) => Err(ClientError::Receive(e)),
        }
    }

    /// Further lines (`logs -f`); `None` at the end.
    pub fn next_line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_owner_or_root_may_control() {
        assert!(peer_allowed(1000, 1000));
        assert!(peer_allowed(0, 1000));
        assert!(!peer_allowed(1001, 1000));
    }

    #[test]
    fn held_shares_are_given_back() {
        let pool = Rc::new(Cell::new(0));
        let a = Held::take(&pool, 2, 3).expect("room");
        assert!(Held::take(&pool, 2, 3).is_none());
        let mut b = Held::take(&pool, 1, 3).expect("room");
        b.release(5);
        assert_eq!(pool.get(), 2);
        drop(a);
        drop(b);
        assert_eq!(pool.get(), 0);
    }
}
