//! One Node worker's IPC channel: herd's end of the socketpair.
//!
//! Writing ([`Channel`]) keeps Node's discipline with a window: each message that carries an
//! fd must be answered with `NODE_HANDLE_ACK`, and once [`WINDOW`] are unanswered every later
//! message waits; a `NODE_HANDLE_NACK` (the fd did not arrive) retransmits, at most
//! [`MAX_NACKS`] times. Messages are written
//! inline when the channel is idle and queued otherwise; a queued channel asks the supervisor
//! to call [`Channel::flush`] again once the socket is writable. The round-robin hand-off
//! (`newconn`) is queued as a small [`Out::NewConn`] record and encoded into a reused buffer,
//! so a connection costs no allocation here.
//!
//! Reading ([`read_loop`]) turns lines into owned [`Ipc`] events for the supervisor. fds a
//! worker sends herd (user code `process.send(msg, socket)`) are acknowledged and closed:
//! herd has no use for them, and holding them would leak.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Instant;

use herd_proto::fdpass;
use herd_proto::node::{self, Lines, Message, QueryServer};
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::mpsc::UnboundedSender;

use crate::supervisor::{Event, WorkerId};

/// Retransmissions of one fd message after NACKs, as Node does.
pub const MAX_NACKS: u8 = 3;

/// fd messages herd lets a worker leave unanswered before it holds the rest back. Node's
/// own primary allows 1 (it waits for each ACK). On Linux a `recvmsg` never returns two
/// fds' segments at once, so several in flight are safe (spec §4: 18 were seen working),
/// and a window lets one wake-up of herd hand over a burst of connections instead of one,
/// which is most of the supervisor's cost per connection under load.
pub const WINDOW: usize = 8;

/// A message waiting to be written.
pub enum Out {
    /// A connection for the worker (round-robin/sticky). The fd is owned by the worker's
    /// in-flight list until the worker answers, so it outlives this record.
    NewConn {
        key_json: Rc<str>,
        seq: u64,
        fd: RawFd,
    },
    /// Any other line, with an fd that its owner keeps open.
    Line { bytes: Vec<u8>, fd: Option<RawFd> },
    /// herd's event-loop ping: a `NODE_HANDLE` without an fd, which Node's IPC code answers
    /// with `NODE_HANDLE_NACK` from inside the worker's event loop (spec §4). The inner
    /// message is internal (`NODE_…`), so the app never sees it.
    Ping,
}

const PING: &[u8] =
    b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{\"cmd\":\"NODE_HERD_PING\"}}\n";

impl Out {
    fn fd(&self) -> Option<RawFd> {
        match self {
            Out::NewConn { fd, .. } => Some(*fd),
            Out::Line { fd, .. } => *fd,
            Out::Ping => None,
        }
    }

    /// Waits for `NODE_HANDLE_ACK`/`NACK` before anything else is written.
    fn gates(&self) -> bool {
        self.fd().is_some() || matches!(self, Out::Ping)
    }
}

/// Whether everything queued went out.
#[derive(Debug, PartialEq, Eq)]
pub enum Flush {
    Done,
    /// The socket is full: call [`Channel::flush`] again when it is writable.
    Blocked,
}

pub struct Channel {
    sock: Rc<UnixStream>,
    seq: u64,
    queue: VecDeque<Out>,
    /// An fd message (or ping) sent and not yet answered, and since when.
    /// fd messages (and pings) sent and not yet answered, oldest first, with when they went.
    /// The worker answers them in order, so each ACK/NACK belongs to the front.
    unanswered: VecDeque<(Out, Instant)>,
    /// Pings answered so far.
    pongs: u64,
    nacks: u8,
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
            pongs: 0,
            nacks: 0,
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

    /// Queues `out` and writes what can be written now.
    pub fn push(&mut self, out: Out) -> io::Result<Flush> {
        self.queue.push_back(out);
        self.flush()
    }

    /// A `NODE_CLUSTER` message without fd; `fields` is a JSON object body without braces.
    pub fn cluster(&mut self, fields: &str) -> io::Result<Flush> {
        let seq = self.next_seq();
        let mut bytes = Vec::with_capacity(fields.len() + 48);
        node::encode_cluster(&mut bytes, fields, seq);
        self.push(Out::Line { bytes, fd: None })
    }

    /// A `NODE_CLUSTER` message wrapped in `NODE_HANDLE` with `fd` attached.
    pub fn cluster_with_fd(&mut self, fields: &str, fd: BorrowedFd<'_>) -> io::Result<Flush> {
        use std::os::fd::AsRawFd;
        let seq = self.next_seq();
        let mut bytes = Vec::with_capacity(fields.len() + 96);
        node::encode_handle(&mut bytes, fields, seq);
        self.push(Out::Line {
            bytes,
            fd: Some(fd.as_raw_fd()),
        })
    }

    /// A plain line: a user message or an internal reply (JSON text without newline).
    pub fn line(&mut self, json: &str) -> io::Result<Flush> {
        let mut bytes = Vec::with_capacity(json.len() + 1);
        node::encode_user(&mut bytes, json);
        self.push(Out::Line { bytes, fd: None })
    }

    /// Queues an event-loop ping; [`Channel::pongs`] counts the answers.
    pub fn ping(&mut self) -> io::Result<Flush> {
        self.push(Out::Ping)
    }

    pub fn pongs(&self) -> u64 {
        self.pongs
    }

    /// How long the message in flight has waited for its ACK, if one is.
    pub fn waiting_since(&self) -> Option<Instant> {
        self.unanswered.front().map(|(_, at)| *at)
    }

    /// The worker acknowledged the fd message in flight.
    pub fn on_ack(&mut self) -> io::Result<Flush> {
        self.unanswered.pop_front();
        self.nacks = 0;
        self.flush()
    }

    /// The worker got the last fd message without its fd: send it again, a few times.
    pub fn on_nack(&mut self) -> io::Result<Flush> {
        match self.unanswered.pop_front().map(|(out, _)| out) {
            Some(Out::Ping) => self.pongs += 1,
            Some(out) if self.nacks < MAX_NACKS => {
                self.nacks += 1;
                self.queue.push_front(out);
            }
            Some(_) => self.nacks = 0,
            None => {}
        }
        self.flush()
    }

    /// Writes queued messages until the queue is empty, an fd message awaits its ACK, or the
    /// socket is full.
    pub fn flush(&mut self) -> io::Result<Flush> {
        // Nothing follows a ping until it is answered: the kernel may deliver the ping's line
        // and the next fd message's line in one read, and Node then pins that fd on the
        // first NODE_HANDLE it parses (the ping), ACKs the ping and NACKs the hand-off.
        while self.unanswered.len() < WINDOW
            && !matches!(self.unanswered.back(), Some((Out::Ping, _)))
        {
            let Some(front) = self.queue.front() else {
                return Ok(Flush::Done);
            };
            let bytes: &[u8] = match front {
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
            let fd = if self.partial == 0 { front.fd() } else { None };
            let rest = &bytes[self.partial..];
            let total = bytes.len();
            let sock = &self.sock;
            let sent = sock.try_io(Interest::WRITABLE, || {
                // SAFETY: the fd's owner keeps it open while it is queued (see `Out`).
                let fd = fd.map(|fd| unsafe { BorrowedFd::borrow_raw(fd) });
                fdpass::send(sock.as_fd(), rest, fd)
            });
            match sent {
                Ok(n) => {
                    self.partial += n;
                    if self.partial == total {
                        self.partial = 0;
                        let out = self.queue.pop_front().expect("front exists");
                        if out.gates() {
                            self.unanswered.push_back((out, Instant::now()));
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flush::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Flush::Done)
    }
}

/// An owned message from a worker, for the supervisor.
#[derive(Debug)]
pub enum Ipc {
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

fn to_owned(msg: Message<'_>) -> Option<Ipc> {
    Some(match msg {
        Message::HandleAck => Ipc::HandleAck,
        Message::HandleNack => Ipc::HandleNack,
        Message::Handle { .. } => Ipc::WorkerHandle,
        Message::Reply { ack, accepted } => Ipc::Reply {
            ack: u64::try_from(ack).ok()?,
            accepted,
        },
        Message::Online => Ipc::Online,
        Message::QueryServer(q) => Ipc::QueryServer(q),
        Message::BadQueryServer { seq, detail } => Ipc::BadQueryServer { seq, detail },
        Message::Listening => Ipc::Listening,
        Message::Close { key } => Ipc::Close {
            key: key.into_owned(),
        },
        Message::ExitedAfterDisconnect { seq } => Ipc::ExitedAfterDisconnect { seq },
        Message::SocketNotifyClose { key } => Ipc::SocketNotifyClose {
            key: key.into_owned(),
        },
        Message::SocketGetCount { key } => Ipc::SocketGetCount {
            key: key.into_owned(),
        },
        Message::OtherInternal => return None,
        Message::User(raw) => Ipc::User(raw.to_string()),
    })
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
    let mut fds: VecDeque<OwnedFd> = VecDeque::new();
    let mut received: Vec<OwnedFd> = Vec::new();
    loop {
        sock.readable().await.map_err(|e| e.to_string())?;
        let spare = lines.spare(8192);
        let spare_len = spare.len();
        let got = sock.try_io(Interest::READABLE, || {
            fdpass::recv(sock.as_fd(), spare, &mut received)
        });
        let n = match got {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                lines.filled(spare_len, 0);
                continue;
            }
            // A killed worker's socket can report a reset instead of a clean EOF.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(format!("reading its IPC channel: {e}")),
        };
        lines.filled(spare_len, n);
        fds.extend(received.drain(..));
        if fds.len() > MAX_HELD_FDS {
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
            let msg = match node::parse(line) {
                Ok(msg) => msg,
                Err(e) => {
                    let _ = tx.send(Event::Ipc {
                        id,
                        msg: Ipc::Garbage(e.to_string()),
                    });
                    continue;
                }
            };
            if matches!(msg, Message::Handle { .. }) {
                // The fd that came with this line: herd does not keep workers' sockets.
                drop(fds.pop_front());
            }
            if let Some(msg) = to_owned(msg) {
                if tx.send(Event::Ipc { id, msg }).is_err() {
                    return Ok(());
                }
            }
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

    #[tokio::test(flavor = "current_thread")]
    async fn nothing_follows_a_ping_until_it_is_answered() {
        let (mut chan, theirs) = pair();
        chan.socket().writable().await.expect("writable");
        chan.ping().expect("ping");
        let file = std::fs::File::open("/dev/null").expect("an fd to pass");
        chan.cluster_with_fd(r#""act":"x""#, file.as_fd())
            .expect("queued");
        let first = read_all(&theirs);
        assert!(first.contains("NODE_HERD_PING"), "{first}");
        assert!(
            !first.contains(r#""act":"x""#),
            "the fd message waited: {first}"
        );
        chan.on_nack().expect("pong");
        assert_eq!(chan.pongs(), 1);
        let second = read_all(&theirs);
        assert!(
            second.contains(r#""act":"x""#),
            "sent once the ping was answered: {second}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn answers_match_fd_messages_in_order_and_nacks_retransmit() {
        let (mut chan, theirs) = pair();
        chan.socket().writable().await.expect("writable");
        let file = std::fs::File::open("/dev/null").expect("an fd to pass");
        chan.cluster_with_fd(r#""n":1"#, file.as_fd())
            .expect("sent");
        chan.cluster_with_fd(r#""n":2"#, file.as_fd())
            .expect("sent");
        let mut seen = String::new();
        for _ in 0..2 {
            seen += &read_all(&theirs);
        }
        assert!(
            seen.contains(r#""n":1"#) && seen.contains(r#""n":2"#),
            "a window, not one at a time: {seen}"
        );
        chan.on_nack().expect("the first is sent again");
        let again = read_all(&theirs);
        assert!(again.contains(r#""n":1"#), "{again}");
        assert!(chan.waiting_since().is_some());
        chan.on_ack().expect("ack");
        chan.on_ack().expect("ack");
        assert!(chan.waiting_since().is_none(), "every fd message answered");
    }
}
