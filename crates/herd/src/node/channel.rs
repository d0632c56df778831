//! One Node worker's IPC channel: herd's end of the socketpair.
//!
//! Writing ([`Channel`]) keeps Node's discipline with a window: each message that carries an
//! fd must be answered with `NODE_HANDLE_ACK`, and once [`WINDOW`] are unanswered every later
//! message waits; a `NODE_HANDLE_NACK` (the fd did not arrive) retransmits that message, at
//! most [`MAX_NACKS`] times, and then gives it up ([`Answer::GaveUp`]) so its owner can
//! decide its fate. Messages are written inline when the channel is idle and queued
//! otherwise; a queued channel asks the supervisor to call [`Channel::flush`] again once the
//! socket is writable.
//!
//! **Bounds.** A worker decides how fast it reads, so everything queued for it is bounded in
//! bytes ([`MAX_QUEUED_BYTES`], counting what waits for an ACK too). User messages
//! (broadcasts, `herd send`) may use only the first [`MAX_USER_QUEUED_BYTES`] of it: past
//! that they are dropped ([`SendError::Dropped`], counted and logged by the caller), and the
//! rest stays free for the protocol. A protocol message (a reply the worker asked for, a
//! hand-off, a ping) that does not fit means the worker stopped reading while it keeps
//! asking: [`SendError::Stuck`], and the worker is replaced. No single message may be larger
//! than [`MAX_USER_MESSAGE`] / [`MAX_PROTOCOL_MESSAGE`].
//!
//! **fd ownership.** A queued message holds an `Rc<OwnedFd>` of the descriptor it carries,
//! never a raw number: a descriptor cannot be closed (and its number reused for something
//! else) while a message that will send it waits. The round-robin hand-off (`newconn`) is
//! queued as a small [`Out::NewConn`] record and encoded into a reused buffer.
//!
//! Reading ([`read_loop`]) turns lines into owned [`Ipc`] events for the supervisor, and
//! stops reading while more than [`MAX_INBOX`] bytes of them wait to be handled. fds a
//! worker sends herd (user code `process.send(msg, socket)`) are acknowledged and closed:
//! herd has no use for them, and holding them would leak. They are closed on a separate
//! thread ([`close_elsewhere`]), never on the runtime thread: the worker chose them, and the
//! last `close()` of a lingering socket or a FUSE file can block for as long as it likes.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::Duration;

use herd_proto::fdpass;
use herd_proto::node::{self, ClusterMessage, Internal, Lines, Message, QueryServer};
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

use crate::vocab::{Event, WorkerId};

/// Retransmissions of one fd message after NACKs, as Node does.
pub const MAX_NACKS: u8 = 3;

/// fd messages herd lets a worker leave unanswered before it holds the rest back. Node's
/// own primary allows 1 (it waits for each ACK). On Linux a `recvmsg` never returns two
/// fds' segments at once, so several in flight are safe (spec §4: 18 were seen working),
/// and a window lets one wake-up of herd hand over a burst of connections instead of one,
/// which is most of the supervisor's cost per connection under load.
pub const WINDOW: usize = 8;

/// Bytes herd keeps for one worker: queued, plus sent and waiting for an ACK.
pub const MAX_QUEUED_BYTES: usize = 4 << 20;
/// The part of [`MAX_QUEUED_BYTES`] user messages may fill; the rest is the protocol's.
pub const MAX_USER_QUEUED_BYTES: usize = 2 << 20;
/// The largest user message herd sends (a broadcast, `herd send`): what it accepts in.
pub const MAX_USER_MESSAGE: usize = node::MAX_LINE;
/// The largest protocol message herd sends. Replies that echo something the worker sent
/// (a key, a `data`) are checked against [`MAX_ECHO`] before they are built.
pub const MAX_PROTOCOL_MESSAGE: usize = 64 << 10;
/// The longest key or `data` herd echoes back to a worker in a reply.
pub const MAX_ECHO: usize = 4096;

/// A message waiting to be written.
pub enum Out {
    /// A connection for the worker (round-robin/sticky). The fd is shared with the worker's
    /// in-flight record: whoever drops last closes it.
    NewConn {
        key_json: Rc<str>,
        seq: u64,
        fd: Rc<OwnedFd>,
    },
    /// Any other line (shared: a broadcast is one allocation for every worker), with the
    /// fd it carries, if any.
    Line {
        bytes: Rc<[u8]>,
        fd: Option<Rc<OwnedFd>>,
        user: bool,
    },
    /// herd's event-loop ping: a `NODE_HANDLE` without an fd, which Node's IPC code answers
    /// with `NODE_HANDLE_NACK` from inside the worker's event loop (spec §4). The inner
    /// message is internal (`NODE_…`), so the app never sees it.
    Ping,
}

const PING: &[u8] =
    b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{\"cmd\":\"NODE_HERD_PING\"}}\n";

/// What a `newconn` record costs besides its key (its encoded length, near enough).
const NEWCONN_BYTES: usize = 112;

impl Out {
    fn fd(&self) -> Option<&Rc<OwnedFd>> {
        match self {
            Out::NewConn { fd, .. } => Some(fd),
            Out::Line { fd, .. } => fd.as_ref(),
            Out::Ping => None,
        }
    }

    /// Waits for `NODE_HANDLE_ACK`/`NACK` before anything else is written.
    fn gates(&self) -> bool {
        self.fd().is_some() || matches!(self, Out::Ping)
    }

    /// The bytes it holds in herd's memory, for the queue's bound.
    fn cost(&self) -> usize {
        match self {
            Out::NewConn { key_json, .. } => key_json.len() + NEWCONN_BYTES,
            Out::Line { bytes, .. } => bytes.len(),
            Out::Ping => PING.len(),
        }
    }

    fn user(&self) -> bool {
        matches!(self, Out::Line { user: true, .. })
    }

    fn conn_seq(&self) -> Option<u64> {
        match self {
            Out::NewConn { seq, .. } => Some(*seq),
            _ => None,
        }
    }
}

/// Whether everything queued went out.
#[derive(Debug, PartialEq, Eq)]
pub enum Flush {
    Done,
    /// The socket is full: call [`Channel::flush`] again when it is writable.
    Blocked,
}

/// Why a message was not queued.
#[derive(Debug)]
pub enum SendError {
    /// A user message that does not fit (too large, or the worker's queue is full): it is
    /// not sent, and the channel carries on.
    Dropped { bytes: usize, why: &'static str },
    /// A protocol message that does not fit: the worker does not read what it asks for.
    Stuck(String),
    /// The socket failed: the worker is going away (its read side reports why).
    Broken,
}

/// What an ACK or NACK answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Nothing was waiting for an answer: a protocol error, ignored.
    Unexpected,
    /// The fd message arrived; `Some(seq)` when it was a connection hand-off.
    Delivered(Option<u64>),
    /// herd's ping came back.
    Pong,
    /// The fd did not arrive: it is sent again.
    Retry,
    /// The fd did not arrive [`MAX_NACKS`] times more: given up. `Some(seq)` when it was a
    /// connection hand-off, which the caller must route elsewhere or close.
    GaveUp(Option<u64>),
}

struct Queued {
    out: Out,
    /// NACKs it got so far.
    nacks: u8,
}

pub struct Channel {
    sock: Rc<UnixStream>,
    seq: u64,
    queue: VecDeque<Queued>,
    /// fd messages (and pings) sent and not yet answered, oldest first, with when they went.
    /// The worker answers them in order, so each ACK/NACK belongs to the front.
    unanswered: VecDeque<(Queued, Instant)>,
    /// Bytes held in `queue` and `unanswered`, and how many of them are user messages.
    bytes: usize,
    user_bytes: usize,
    /// Since when the socket has been full with no byte written.
    blocked_since: Option<Instant>,
    /// Pings answered so far.
    pongs: u64,
    /// Bytes of the queue's front already written.
    partial: usize,
    scratch: Vec<u8>,
}

impl Channel {
    pub fn new(sock: Rc<UnixStream>) -> Self {
        Channel {
            sock,
            seq: 0,
            queue: VecDeque::new(),
            unanswered: VecDeque::new(),
            bytes: 0,
            user_bytes: 0,
            blocked_since: None,
            pongs: 0,
            partial: 0,
            scratch: Vec::with_capacity(256),
        }
    }

    pub fn socket(&self) -> &Rc<UnixStream> {
        &self.sock
    }

    pub fn next_seq(&mut self) -> u64 {
        let seq = self.seq;
        self.seq += 1;
        seq
    }

    /// Bytes held for this worker now (queued or waiting for an ACK).
    #[cfg(test)]
    pub fn held_bytes(&self) -> usize {
        self.bytes
    }

    /// Queues `out` within the bounds and writes what can be written now.
    pub fn push(&mut self, out: Out) -> Result<Flush, SendError> {
        let cost = out.cost();
        if out.user() {
            if cost > MAX_USER_MESSAGE {
                return Err(SendError::Dropped {
                    bytes: cost,
                    why: "larger than herd sends",
                });
            }
            if self.user_bytes + cost > MAX_USER_QUEUED_BYTES
                || self.bytes + cost > MAX_QUEUED_BYTES
            {
                return Err(SendError::Dropped {
                    bytes: cost,
                    why: "the worker is not reading its channel",
                });
            }
            self.user_bytes += cost;
        } else {
            if cost > MAX_PROTOCOL_MESSAGE {
                return Err(SendError::Stuck(format!(
                    "herd would have to send it a {cost}-byte protocol message"
                )));
            }
            if self.bytes + cost > MAX_QUEUED_BYTES {
                return Err(SendError::Stuck(format!(
                    "it does not read its IPC channel: {} bytes wait for it (limit {MAX_QUEUED_BYTES})",
                    self.bytes
                )));
            }
        }
        self.bytes += cost;
        self.queue.push_back(Queued { out, nacks: 0 });
        self.flush()
    }

    fn forget(&mut self, out: &Out) {
        let cost = out.cost();
        self.bytes -= cost;
        if out.user() {
            self.user_bytes -= cost;
        }
    }

    /// A `NODE_CLUSTER` message without fd.
    pub fn cluster(&mut self, msg: &ClusterMessage<'_>) -> Result<Flush, SendError> {
        let seq = self.next_seq();
        let mut bytes = Vec::with_capacity(128);
        node::encode_cluster_message(&mut bytes, msg, seq);
        self.push(Out::Line {
            bytes: bytes.into(),
            fd: None,
            user: false,
        })
    }

    /// A `NODE_CLUSTER` message wrapped in `NODE_HANDLE` with `fd` attached.
    pub fn cluster_with_fd(
        &mut self,
        msg: &ClusterMessage<'_>,
        fd: Rc<OwnedFd>,
    ) -> Result<Flush, SendError> {
        let seq = self.next_seq();
        let mut bytes = Vec::with_capacity(160);
        node::encode_handle_message(&mut bytes, msg, seq);
        self.push(Out::Line {
            bytes: bytes.into(),
            fd: Some(fd),
            user: false,
        })
    }

    /// An internal message outside `NODE_CLUSTER` (`NODE_HANDLE_ACK`, `NODE_SOCKET_…`).
    pub fn internal(&mut self, msg: &Internal<'_>) -> Result<Flush, SendError> {
        let mut bytes = Vec::with_capacity(64);
        node::encode_internal(&mut bytes, msg);
        self.push(Out::Line {
            bytes: bytes.into(),
            fd: None,
            user: false,
        })
    }

    /// A user message, already encoded by [`user_line`]: droppable.
    pub fn user(&mut self, line: Rc<[u8]>) -> Result<Flush, SendError> {
        self.push(Out::Line {
            bytes: line,
            fd: None,
            user: true,
        })
    }

    /// Queues an event-loop ping; [`Channel::pongs`] counts the answers.
    pub fn ping(&mut self) -> Result<Flush, SendError> {
        self.push(Out::Ping)
    }

    pub fn pongs(&self) -> u64 {
        self.pongs
    }

    /// Since when herd has waited on the worker: the oldest fd message it has not answered,
    /// or a socket it has not read from while herd had more to write.
    pub fn waiting_since(&self) -> Option<Instant> {
        let acks = self.unanswered.front().map(|(_, at)| *at);
        acks.into_iter().chain(self.blocked_since).min()
    }

    /// The worker acknowledged the oldest fd message in flight. Call [`Channel::flush`]
    /// after.
    pub fn on_ack(&mut self) -> Answer {
        let Some((q, _)) = self.unanswered.pop_front() else {
            return Answer::Unexpected;
        };
        self.forget(&q.out);
        match q.out {
            Out::Ping => {
                self.pongs += 1;
                Answer::Pong
            }
            out => Answer::Delivered(out.conn_seq()),
        }
    }

    /// The worker got the oldest fd message without its fd: send it again, a few times.
    /// Call [`Channel::flush`] after.
    pub fn on_nack(&mut self) -> Answer {
        let Some((mut q, _)) = self.unanswered.pop_front() else {
            return Answer::Unexpected;
        };
        if matches!(q.out, Out::Ping) {
            self.forget(&q.out);
            self.pongs += 1;
            return Answer::Pong;
        }
        if q.nacks < MAX_NACKS {
            q.nacks += 1;
            self.queue.push_front(q);
            return Answer::Retry;
        }
        self.forget(&q.out);
        Answer::GaveUp(q.out.conn_seq())
    }

    /// Writes queued messages until the queue is empty, an fd message awaits its ACK, or the
    /// socket is full.
    pub fn flush(&mut self) -> Result<Flush, SendError> {
        // Nothing follows a ping until it is answered: the kernel may deliver the ping's line
        // and the next fd message's line in one read, and Node then pins that fd on the
        // first NODE_HANDLE it parses (the ping), ACKs the ping and NACKs the hand-off.
        while self.unanswered.len() < WINDOW
            && !matches!(
                self.unanswered.back(),
                Some((Queued { out: Out::Ping, .. }, _))
            )
        {
            let Some(front) = self.queue.front() else {
                self.blocked_since = None;
                return Ok(Flush::Done);
            };
            let bytes: &[u8] = match &front.out {
                Out::NewConn { key_json, seq, .. } => {
                    if self.partial == 0 {
                        self.scratch.clear();
                        node::encode_newconn(&mut self.scratch, key_json, *seq);
                    }
                    &self.scratch
                }
                Out::Line { bytes, .. } => bytes,
                Out::Ping => PING,
            };
            let fd = if self.partial == 0 {
                front.out.fd().map(|fd| fd.as_fd())
            } else {
                None
            };
            let rest = &bytes[self.partial..];
            let total = bytes.len();
            let sock = &self.sock;
            let sent = sock.try_io(Interest::WRITABLE, || fdpass::send(sock.as_fd(), rest, fd));
            match sent {
                Ok(n) => {
                    self.blocked_since = None;
                    self.partial += n;
                    if self.partial == total {
                        self.partial = 0;
                        let q = self.queue.pop_front().expect("front exists");
                        if q.out.gates() {
                            self.unanswered.push_back((q, Instant::now()));
                        } else {
                            self.forget(&q.out);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.blocked_since.get_or_insert_with(Instant::now);
                    return Ok(Flush::Blocked);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(SendError::Broken),
            }
        }
        Ok(Flush::Done)
    }
}

/// A user message line for [`Channel::user`]: `value` as one JSON line, or why it may not go
/// to a worker. Node takes a top-level object whose `cmd` starts with `NODE_` for one of its
/// own (cluster) messages and acts on it, so no such value is ever sent as a user message.
pub fn user_line(value: &serde_json::Value) -> Result<Rc<[u8]>, String> {
    if node::is_internal(value) {
        return Err(
            "its `cmd` starts with NODE_, which Node reserves for its cluster internals (a worker \
             would act on it, not see it) — rename the field or nest the message"
                .into(),
        );
    }
    let mut line = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    if line.len() > MAX_USER_MESSAGE {
        return Err(format!(
            "it is {} bytes; herd sends at most {MAX_USER_MESSAGE}",
            line.len()
        ));
    }
    line.push(b'\n');
    Ok(line.into())
}

/// Counts an event that can come in floods, and says when to log it: at most once a
/// second, with how many were not logged in between.
#[derive(Debug, Default)]
pub struct Tally {
    pub total: u64,
    unlogged: u64,
    last_log: Option<Instant>,
}

impl Tally {
    /// Counts one; `Some(n)` when it should be logged now, `n` counting this one and those
    /// not logged since the last time.
    pub fn note(&mut self) -> Option<u64> {
        self.total = self.total.saturating_add(1);
        self.unlogged = self.unlogged.saturating_add(1);
        let now = Instant::now();
        if self
            .last_log
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return None;
        }
        self.last_log = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// fds herd may have waiting to be closed before it refuses more from workers.
const CLOSER_QUEUE: usize = 1024;

/// Closes `fd` on herd's closer thread, never on the caller's (see the module header).
/// When the closer is backed up (its `close()`s block), the fd is closed on a thread of its
/// own and `false` says so: the worker that sent it is treated as misbehaving.
pub fn close_elsewhere(fd: OwnedFd) -> bool {
    static CLOSER: OnceLock<Option<SyncSender<OwnedFd>>> = OnceLock::new();
    let closer = CLOSER.get_or_init(|| {
        let (tx, rx) = sync_channel::<OwnedFd>(CLOSER_QUEUE);
        std::thread::Builder::new()
            .name("herd-fd-closer".into())
            .spawn(move || rx.into_iter().for_each(drop))
            .ok()
            .map(|_| tx)
    });
    let fd = match closer {
        Some(tx) => match tx.try_send(fd) {
            Ok(()) => return true,
            Err(TrySendError::Full(fd) | TrySendError::Disconnected(fd)) => fd,
        },
        None => fd,
    };
    // Rare (the worker is then killed), so a thread for this one fd is affordable. If no
    // thread can be had, the closure is dropped here without closing the fd: leaking it
    // beats blocking the runtime.
    let fd = std::mem::ManuallyDrop::new(fd);
    let _ = std::thread::Builder::new()
        .name("herd-fd-closer".into())
        .spawn(move || drop(std::mem::ManuallyDrop::into_inner(fd)));
    false
}

/// An owned message from a worker, for the supervisor, with its share of the worker's inbox
/// (see [`read_loop`]): dropping it, once handled, lets the reader read more.
#[derive(Debug)]
pub struct Ipc {
    pub kind: IpcKind,
    _charge: Charge,
}

/// What a worker said.
#[derive(Debug)]
pub enum IpcKind {
    HandleAck,
    HandleNack,
    /// The worker sent herd an fd; it must be acknowledged.
    WorkerHandle,
    Reply {
        ack: u64,
        accepted: Option<bool>,
    },
    Online,
    QueryServer(Box<QueryServer>),
    BadQueryServer {
        seq: Option<i64>,
        detail: String,
    },
    Listening,
    Close {
        key: String,
    },
    ExitedAfterDisconnect {
        seq: i64,
    },
    SocketNotifyClose {
        key: String,
    },
    SocketGetCount {
        key: String,
    },
    User(String),
    /// A line herd could not read; logged, and the worker carries on.
    Garbage(String),
}

fn to_owned(msg: Message<'_>) -> Option<IpcKind> {
    Some(match msg {
        Message::HandleAck => IpcKind::HandleAck,
        Message::HandleNack => IpcKind::HandleNack,
        Message::Handle { .. } => IpcKind::WorkerHandle,
        Message::Reply { ack, accepted } => IpcKind::Reply {
            ack: u64::try_from(ack).ok()?,
            accepted,
        },
        Message::Online => IpcKind::Online,
        Message::QueryServer(q) => IpcKind::QueryServer(q),
        Message::BadQueryServer { seq, detail } => IpcKind::BadQueryServer { seq, detail },
        Message::Listening => IpcKind::Listening,
        Message::Close { key } => IpcKind::Close {
            key: key.into_owned(),
        },
        Message::ExitedAfterDisconnect { seq } => IpcKind::ExitedAfterDisconnect { seq },
        Message::SocketNotifyClose { key } => IpcKind::SocketNotifyClose {
            key: key.into_owned(),
        },
        Message::SocketGetCount { key } => IpcKind::SocketGetCount {
            key: key.into_owned(),
        },
        Message::OtherInternal => return None,
        Message::User(raw) => IpcKind::User(raw.to_string()),
    })
}

/// Bytes of a worker's messages read and not yet handled by the supervisor. The reader waits
/// past this, so a worker that writes faster than herd handles is held back by its own
/// socket, not buffered in herd.
const MAX_INBOX: usize = 2 << 20;
/// What an event costs besides its line, so a flood of tiny lines is bounded too.
const EVENT_COST: usize = 128;

#[derive(Default)]
struct Inbox {
    bytes: std::cell::Cell<usize>,
    handled: tokio::sync::Notify,
}

/// One message's share of its worker's [`Inbox`], returned on drop.
struct Charge {
    inbox: Rc<Inbox>,
    bytes: usize,
}

impl Charge {
    fn new(inbox: &Rc<Inbox>, bytes: usize) -> Self {
        inbox.bytes.set(inbox.bytes.get() + bytes);
        Charge {
            inbox: Rc::clone(inbox),
            bytes,
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.inbox.bytes.set(self.inbox.bytes.get() - self.bytes);
        self.inbox.handled.notify_one();
    }
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes", self.bytes)
    }
}

/// Most fds herd holds from a worker before it is treated as misbehaving.
const MAX_HELD_FDS: usize = 16;

/// Reads a worker's channel until EOF or an unrecoverable error, then reports the end.
pub async fn read_loop(sock: Rc<UnixStream>, id: WorkerId, tx: UnboundedSender<Event>) {
    let reason = read_until_end(&sock, id, &tx).await.err();
    let _ = tx.send(Event::IpcClosed { id, reason });
}

async fn read_until_end(
    sock: &UnixStream,
    id: WorkerId,
    tx: &UnboundedSender<Event>,
) -> Result<(), String> {
    let mut lines = Lines::default();
    let mut fds = HeldFds::default();
    let mut received: Vec<OwnedFd> = Vec::new();
    let inbox = Rc::new(Inbox::default());
    loop {
        while inbox.bytes.get() > MAX_INBOX {
            inbox.handled.notified().await;
        }
        sock.readable().await.map_err(|e| e.to_string())?;
        let spare = lines.spare(8192);
        let spare_len = spare.len();
        let mut drained = None;
        let got = sock.try_io(Interest::READABLE, || {
            let n = fdpass::recv(sock.as_fd(), &mut *spare, &mut received)?;
            if n > 0 && n < spare_len && received.is_empty() {
                // A short read that brought no fd took everything queued (on a unix stream
                // socket `recvmsg` stops early only after an fd, or at out-of-band data,
                // which a worker can only use against its own channel): tell tokio the
                // socket is drained, so the next read waits for the worker's next write
                // (a new epoll edge) instead of costing a `recvmsg` that finds nothing.
                drained = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let got = match (got, drained) {
            (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
            (got, _) => got,
        };
        let n = match got {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                lines.filled(spare_len, 0);
                fds.0.extend(received.drain(..));
                continue;
            }
            // A killed worker's socket can report a reset instead of a clean EOF.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => {
                fds.0.extend(received.drain(..));
                return Err(format!("reading its IPC channel: {e}"));
            }
        };
        lines.filled(spare_len, n);
        fds.0.extend(received.drain(..));
        if fds.0.len() > MAX_HELD_FDS {
            return Err(format!(
                "it sent more than {MAX_HELD_FDS} file descriptors herd did not ask for"
            ));
        }
        if n == 0 {
            return Ok(());
        }
        loop {
            let line = match lines.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(e) => return Err(e.to_string()),
            };
            let charge = Charge::new(&inbox, line.len() + EVENT_COST);
            let msg = match node::parse(line) {
                Ok(msg) => msg,
                Err(e) => {
                    let msg = Ipc {
                        kind: IpcKind::Garbage(e.to_string()),
                        _charge: charge,
                    };
                    let _ = tx.send(Event::Ipc { id, msg });
                    continue;
                }
            };
            if matches!(msg, Message::Handle { .. }) {
                // The fd that came with this line: herd does not keep workers' sockets.
                if let Some(fd) = fds.0.pop_front() {
                    if !close_elsewhere(fd) {
                        return Err(
                            "it sent file descriptors faster than herd can close them".into()
                        );
                    }
                }
            }
            if let Some(kind) = to_owned(msg) {
                let msg = Ipc {
                    kind,
                    _charge: charge,
                };
                if tx.send(Event::Ipc { id, msg }).is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// fds a worker sent that no line claimed yet; closed off the runtime thread when dropped.
#[derive(Default)]
struct HeldFds(VecDeque<OwnedFd>);

impl Drop for HeldFds {
    fn drop(&mut self) {
        for fd in self.0.drain(..) {
            close_elsewhere(fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Channel, std::os::unix::net::UnixStream) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        ours.set_nonblocking(true).expect("nonblocking");
        let sock = UnixStream::from_std(ours).expect("tokio stream");
        (Channel::new(Rc::new(sock)), theirs)
    }

    fn read_all(theirs: &std::os::unix::net::UnixStream) -> String {
        theirs.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 4096];
        let mut fds = Vec::new();
        let n = fdpass::recv(theirs, &mut buf, &mut fds).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    fn devnull() -> Rc<OwnedFd> {
        Rc::new(
            std::fs::File::open("/dev/null")
                .expect("an fd to pass")
                .into(),
        )
    }

    #[tokio::test(flavor = "current_thread")]
    async fn nothing_follows_a_ping_until_it_is_answered() {
        let (mut chan, theirs) = pair();
        chan.socket().writable().await.expect("writable");
        chan.ping().expect("ping");
        chan.cluster_with_fd(&ClusterMessage::Ack { ack: 77 }, devnull())
            .expect("queued");
        let first = read_all(&theirs);
        assert!(first.contains("NODE_HERD_PING"), "{first}");
        assert!(
            !first.contains(r#""ack":77"#),
            "the fd message waited: {first}"
        );
        assert_eq!(chan.on_nack(), Answer::Pong);
        chan.flush().expect("flush");
        assert_eq!(chan.pongs(), 1);
        let second = read_all(&theirs);
        assert!(
            second.contains(r#""ack":77"#),
            "sent once the ping was answered: {second}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn answers_match_fd_messages_in_order_and_nacks_retransmit() {
        let (mut chan, theirs) = pair();
        chan.socket().writable().await.expect("writable");
        chan.cluster_with_fd(&ClusterMessage::Ack { ack: 1 }, devnull())
            .expect("sent");
        chan.cluster_with_fd(&ClusterMessage::Ack { ack: 2 }, devnull())
            .expect("sent");
        let mut seen = String::new();
        for _ in 0..2 {
            seen += &read_all(&theirs);
        }
        assert!(
            seen.contains(r#""ack":1"#) && seen.contains(r#""ack":2"#),
            "a window, not one at a time: {seen}"
        );
        assert_eq!(chan.on_nack(), Answer::Retry);
        chan.flush().expect("the first is sent again");
        let again = read_all(&theirs);
        assert!(again.contains(r#""ack":1"#), "{again}");
        assert!(chan.waiting_since().is_some());
        assert_eq!(chan.on_ack(), Answer::Delivered(None));
        assert_eq!(chan.on_ack(), Answer::Delivered(None));
        assert!(chan.waiting_since().is_none(), "every fd message answered");
        assert_eq!(chan.on_ack(), Answer::Unexpected, "an ACK for nothing");
        assert_eq!(chan.held_bytes(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_hand_off_nacked_past_the_limit_is_given_back() {
        let (mut chan, theirs) = pair();
        chan.socket().writable().await.expect("writable");
        let seq = chan.next_seq();
        let fd = devnull();
        chan.push(Out::NewConn {
            key_json: Rc::from("\"k\""),
            seq,
            fd: Rc::clone(&fd),
        })
        .expect("sent");
        for _ in 0..MAX_NACKS {
            let _ = read_all(&theirs);
            assert_eq!(chan.on_nack(), Answer::Retry);
            chan.flush().expect("again");
        }
        assert_eq!(chan.on_nack(), Answer::GaveUp(Some(seq)));
        assert_eq!(
            Rc::strong_count(&fd),
            1,
            "the channel let go of the connection"
        );
        assert_eq!(chan.held_bytes(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_worker_that_does_not_read_gets_drops_then_is_stuck() {
        let (mut chan, _theirs) = pair();
        chan.socket().writable().await.expect("writable");
        let line: Rc<[u8]> = vec![b'1'; 64 << 10].into();
        let mut dropped = 0;
        for _ in 0..200 {
            match chan.user(Rc::clone(&line)) {
                Ok(_) => {}
                Err(SendError::Dropped { .. }) => dropped += 1,
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!(dropped > 0, "user messages past the bound are dropped");
        assert!(chan.held_bytes() <= MAX_USER_QUEUED_BYTES);
        let key = "k".repeat(4000);
        let reply = Internal::SocketCount {
            key: &key,
            count: 0,
        };
        let stuck = (0..2000).find_map(|_| match chan.internal(&reply) {
            Err(SendError::Stuck(why)) => Some(why),
            _ => None,
        });
        assert!(
            stuck.is_some(),
            "protocol replies past the bound mean stuck"
        );
        assert!(chan.held_bytes() <= MAX_QUEUED_BYTES);
    }

    #[test]
    fn user_messages_never_look_like_nodes_own() {
        use serde_json::json;
        assert!(user_line(&json!({"cmd": "NODE_CLUSTER", "act": "disconnect"})).is_err());
        assert!(user_line(&json!({"cmd": "NODE_HANDLE"})).is_err());
        assert!(user_line(&json!({"cmd": "invalidate"})).is_ok());
        assert!(user_line(&json!({"x": {"cmd": "NODE_CLUSTER"}})).is_ok());
        assert_eq!(&*user_line(&json!([1])).expect("line"), b"[1]\n");
    }

    #[test]
    fn tallies_count_every_event_and_log_some() {
        let mut t = Tally::default();
        assert_eq!(t.note(), Some(1));
        assert_eq!(t.note(), None);
        assert_eq!(t.note(), None);
        assert_eq!(t.total, 3);
    }
}
