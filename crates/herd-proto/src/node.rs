//! Node.js cluster IPC messages (specs/node-cluster-protocol.md) in JSON serialization mode.
//!
//! The channel is a byte stream of `JSON + "\n"` lines. [`Lines`] splits it with a hard
//! limit on line length, so a worker that never sends a newline cannot grow herd's memory.
//! [`parse`] classifies one line without allocating for the messages on the round-robin hot
//! path (`NODE_HANDLE_ACK` and the `{ack, accepted}` reply): they are deserialized into
//! borrowed fields. The `encode_*` functions append exact wire bytes to a reusable buffer:
//! herd's own messages are types ([`ClusterMessage`], [`QueryServerReply`], [`Internal`])
//! serialized with serde, except the per-connection `newconn` ([`encode_newconn`]), which
//! is written by hand so that the hot path does not allocate.
//!
//! A message is *internal* when it is an object whose `cmd` is a string starting with
//! `NODE_` (and longer than 5 characters); anything else is a user message. Node decides
//! this on the top-level value only (`isInternal` in `lib/internal/child_process.js`), and
//! acts on internal messages instead of showing them to the app, so herd never sends a user
//! message that [`is_internal`] accepts: a worker's broadcast or `herd send` data could
//! otherwise tell every worker `{"cmd":"NODE_CLUSTER","act":"disconnect"}`.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Longest line accepted from a worker (1 MiB). Longer means a broken or hostile worker.
pub const MAX_LINE: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("line longer than {MAX_LINE} bytes on the IPC channel")]
    LineTooLong,
    #[error("not JSON on the IPC channel: {0}")]
    NotJson(String),
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
}

/// A line splitter over a growable buffer with a length limit.
#[derive(Debug)]
pub struct Lines {
    buf: Vec<u8>,
    start: usize,
    scanned: usize,
    max: usize,
}

impl Default for Lines {
    fn default() -> Self {
        Lines::with_limit(MAX_LINE)
    }
}

impl Lines {
    pub fn with_limit(max: usize) -> Self {
        Lines {
            buf: Vec::with_capacity(8192),
            start: 0,
            scanned: 0,
            max,
        }
    }

    /// Space to read into; call [`Lines::filled`] with the count read.
    pub fn spare(&mut self, at_least: usize) -> &mut [u8] {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            self.scanned = 0;
        } else if self.start > self.buf.capacity() / 2 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        let len = self.buf.len();
        self.buf.resize(len + at_least, 0);
        &mut self.buf[len..]
    }

    /// Declares `n` bytes of the last [`Lines::spare`] slice filled; the rest is dropped.
    pub fn filled(&mut self, spare_len: usize, n: usize) {
        let len = self.buf.len();
        self.buf.truncate(len - spare_len + n);
    }

    /// The next complete line (without its `\n`), if any.
    pub fn next_line(&mut self) -> Result<Option<&[u8]>, ProtoError> {
        match self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            Some(i) => {
                let end = self.scanned + i;
                let line = self.start..end;
                self.start = end + 1;
                self.scanned = self.start;
                if line.len() > self.max {
                    return Err(ProtoError::LineTooLong);
                }
                Ok(Some(&self.buf[line]))
            }
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() - self.start > self.max {
                    return Err(ProtoError::LineTooLong);
                }
                Ok(None)
            }
        }
    }

    /// Bytes held but not yet returned as a line.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// The fields herd reads from any message, borrowed from the line.
#[derive(Deserialize, Default)]
struct Fields<'a> {
    #[serde(borrow)]
    cmd: Option<&'a RawValue>,
    #[serde(borrow)]
    act: Option<Cow<'a, str>>,
    seq: Option<i64>,
    ack: Option<i64>,
    accepted: Option<bool>,
    #[serde(borrow)]
    key: Option<Cow<'a, str>>,
    #[serde(borrow)]
    msg: Option<&'a RawValue>,
}

/// One message from a worker.
#[derive(Debug, PartialEq)]
pub enum Message<'a> {
    HandleAck,
    HandleNack,
    /// The worker sent an fd (`process.send(msg, socket)`); the payload is the inner message.
    Handle {
        inner: &'a str,
    },
    /// `NODE_CLUSTER` with an `ack`: a reply to one of herd's messages.
    Reply {
        ack: i64,
        accepted: Option<bool>,
    },
    Online,
    QueryServer(Box<QueryServer>),
    /// A `queryServer` herd cannot read; `seq` to answer it with an error, if there is one.
    BadQueryServer {
        seq: Option<i64>,
        detail: String,
    },
    Listening,
    Close {
        key: Cow<'a, str>,
    },
    ExitedAfterDisconnect {
        seq: i64,
    },
    SocketNotifyClose {
        key: Cow<'a, str>,
    },
    SocketGetCount {
        key: Cow<'a, str>,
    },
    /// Another internal message herd has no use for.
    OtherInternal,
    /// A user message: the raw JSON text of `process.send(x)`.
    User(&'a str),
}

/// A `queryServer` request: the worker's `listen()`.
#[derive(Debug, Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
pub struct QueryServer {
    pub seq: i64,
    #[serde(default)]
    pub index: i64,
    /// Echoed back verbatim (TLS ticket keys).
    pub data: Option<Box<RawValue>>,
    pub address: Option<String>,
    pub port: Option<i64>,
    /// 4, 6, -1 (unix path) as a number, or "udp4"/"udp6".
    pub address_type: Option<serde_json::Value>,
    pub fd: Option<i64>,
    pub flags: Option<i64>,
    /// A number, or `false` (Node 20 sends `false` for `listen(port, host, cb)`). Unused.
    pub backlog: Option<serde_json::Value>,
    pub readable_all: Option<bool>,
    pub writable_all: Option<bool>,
}

impl PartialEq for QueryServer {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq
            && self.key() == other.key()
            && self.data.as_ref().map(|d| d.get()) == other.data.as_ref().map(|d| d.get())
    }
}

/// What kind of socket a queryServer asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    Tcp4,
    Tcp6,
    Unix,
    Udp4,
    Udp6,
    /// `listen({fd})`: an fd of the primary's. herd has none to give.
    Fd,
}

impl QueryServer {
    pub fn kind(&self) -> Result<ServerKind, ProtoError> {
        if self.fd.is_some_and(|fd| fd >= 0) {
            return Ok(ServerKind::Fd);
        }
        let bad = |detail: String| ProtoError::Malformed {
            what: "queryServer",
            detail,
        };
        match &self.address_type {
            Some(serde_json::Value::Number(n)) => match n.as_i64() {
                Some(4) => Ok(ServerKind::Tcp4),
                Some(6) => Ok(ServerKind::Tcp6),
                Some(-1) => Ok(ServerKind::Unix),
                _ => Err(bad(format!("addressType {n}"))),
            },
            Some(serde_json::Value::String(s)) if s == "udp4" => Ok(ServerKind::Udp4),
            Some(serde_json::Value::String(s)) if s == "udp6" => Ok(ServerKind::Udp6),
            None | Some(serde_json::Value::Null) if self.fd.is_some() => Ok(ServerKind::Fd),
            other => Err(bad(format!("addressType {other:?}"))),
        }
    }

    /// Node's own key format (v20): `address:port:addressType:fd:index`. Opaque to the worker.
    pub fn key(&self) -> String {
        let mut key = String::new();
        let opt_str = |v: &Option<String>| v.clone().unwrap_or_else(|| "null".into());
        let opt_num = |v: Option<i64>| v.map_or_else(|| "undefined".into(), |n| n.to_string());
        let address_type = match &self.address_type {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => "undefined".into(),
        };
        let _ = write!(
            key,
            "{}:{}:{}:{}:{}",
            opt_str(&self.address),
            opt_num(self.port),
            address_type,
            opt_num(self.fd),
            self.index
        );
        key
    }
}

/// Classifies one line from a worker.
pub fn parse(line: &[u8]) -> Result<Message<'_>, ProtoError> {
    let text = std::str::from_utf8(line).map_err(|e| ProtoError::NotJson(e.to_string()))?;
    let fields: Fields<'_> = match serde_json::from_str(text) {
        Ok(fields) => fields,
        // Valid JSON that is not an object of the expected shape is a user message, unless
        // Node would take it for one of its own (a `seq` out of range, say): then it is
        // neither, and must not reach the app's side of herd as a user message.
        Err(e) => {
            let raw: &RawValue =
                serde_json::from_str(text).map_err(|e| ProtoError::NotJson(e.to_string()))?;
            let value: serde_json::Value = serde_json::from_str(raw.get()).unwrap_or_default();
            if is_internal(&value) {
                return Err(ProtoError::Malformed {
                    what: "NODE_ message",
                    detail: e.to_string(),
                });
            }
            return Ok(Message::User(raw.get()));
        }
    };
    let cmd: Option<Cow<'_, str>> = fields.cmd.and_then(|c| serde_json::from_str(c.get()).ok());
    let internal = cmd
        .as_deref()
        .filter(|c| c.starts_with("NODE_") && c.len() > 5);
    let Some(cmd) = internal else {
        let raw: &RawValue =
            serde_json::from_str(text).map_err(|e| ProtoError::NotJson(e.to_string()))?;
        return Ok(Message::User(raw.get()));
    };
    let missing = |what: &'static str, field: &str| ProtoError::Malformed {
        what,
        detail: format!("no `{field}`"),
    };
    Ok(match cmd {
        "NODE_HANDLE_ACK" => Message::HandleAck,
        "NODE_HANDLE_NACK" => Message::HandleNack,
        "NODE_HANDLE" => Message::Handle {
            inner: fields.msg.ok_or(missing("NODE_HANDLE", "msg"))?.get(),
        },
        "NODE_SOCKET_NOTIFY_CLOSE" => Message::SocketNotifyClose {
            key: fields
                .key
                .ok_or(missing("NODE_SOCKET_NOTIFY_CLOSE", "key"))?,
        },
        "NODE_SOCKET_GET_COUNT" => Message::SocketGetCount {
            key: fields.key.ok_or(missing("NODE_SOCKET_GET_COUNT", "key"))?,
        },
        "NODE_CLUSTER" => match (fields.ack, fields.act.as_deref()) {
            (Some(ack), None) => Message::Reply {
                ack,
                accepted: fields.accepted,
            },
            (_, Some("online")) => Message::Online,
            (_, Some("queryServer")) => match serde_json::from_str::<QueryServer>(text) {
                Ok(query) => Message::QueryServer(Box::new(query)),
                // Answer it anyway (with an error) so the app's listen() fails loudly
                // instead of waiting forever for a reply.
                Err(e) => Message::BadQueryServer {
                    seq: fields.seq,
                    detail: e.to_string(),
                },
            },
            (_, Some("listening")) => Message::Listening,
            (_, Some("close")) => Message::Close {
                key: fields.key.ok_or(missing("close", "key"))?,
            },
            (_, Some("exitedAfterDisconnect")) => Message::ExitedAfterDisconnect {
                seq: fields.seq.ok_or(missing("exitedAfterDisconnect", "seq"))?,
            },
            _ => Message::OtherInternal,
        },
        _ => Message::OtherInternal,
    })
}

/// Whether Node would treat `value`, sent as a message, as one of its own: an object whose
/// `cmd` is a string that starts with `NODE_`. Stricter than Node (which also wants more than
/// the prefix), so a future Node that widens its rule is still covered.
pub fn is_internal(value: &serde_json::Value) -> bool {
    value
        .get("cmd")
        .and_then(serde_json::Value::as_str)
        .is_some_and(|cmd| cmd.starts_with("NODE_"))
}

/// The answer to a worker's `queryServer` (its `listen()`), spec §5.4. One type for every
/// outcome; build it with the constructor for the outcome so that `errno` is right:
///
/// | constructor | `errno` | the worker |
/// |---|---|---|
/// | [`QueryServerReply::shared`] | `0` | takes the listening socket that travels with the reply, and runs Node's port check against it |
/// | [`QueryServerReply::round_robin`] | `null` | gets connections from herd (`newconn`); `sockname` is what `server.address()` says |
/// | [`QueryServerReply::refused`], [`QueryServerReply::invalid`] | negative | emits the error from `listen()` |
///
/// Node tells `errno: 0` from `errno: null`, so `errno` is always written, `null` included.
#[derive(Debug, Clone, Serialize)]
pub struct QueryServerReply<'a> {
    pub errno: Option<i32>,
    /// The server's key (Node's format, see [`QueryServer::key`]), echoed back.
    pub key: Cow<'a, str>,
    /// The `seq` of the `queryServer` answered.
    pub ack: i64,
    /// The first worker's `data`, echoed verbatim (TLS ticket keys); `null` when none.
    pub data: Option<&'a RawValue>,
    /// Round-robin TCP only; left out otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sockname: Option<&'a Sockname>,
}

impl<'a> QueryServerReply<'a> {
    /// `shared`: the listening socket travels with this reply (send it with
    /// [`encode_handle_message`]); the worker accepts connections itself.
    pub fn shared(key: &'a str, ack: i64, data: Option<&'a RawValue>) -> Self {
        QueryServerReply {
            errno: Some(0),
            key: Cow::Borrowed(key),
            ack,
            data,
            sockname: None,
        }
    }

    /// `round-robin` and `sticky`: no socket; herd accepts and hands connections over.
    pub fn round_robin(
        key: &'a str,
        ack: i64,
        data: Option<&'a RawValue>,
        sockname: Option<&'a Sockname>,
    ) -> Self {
        QueryServerReply {
            errno: None,
            key: Cow::Borrowed(key),
            ack,
            data,
            sockname,
        }
    }

    /// The bind failed: `errno` is the negative errno `listen()` fails with.
    pub fn refused(errno: i32, key: &'a str, ack: i64, data: Option<&'a RawValue>) -> Self {
        QueryServerReply {
            errno: Some(errno),
            key: Cow::Borrowed(key),
            ack,
            data,
            sockname: None,
        }
    }

    /// A request herd will not serve as asked (unreadable, or too large to echo): `EINVAL`,
    /// with a key of herd's own and without the worker's `data`, so nothing it sent is
    /// echoed back.
    pub fn invalid(seq: i64) -> Self {
        QueryServerReply {
            errno: Some(-rustix::io::Errno::INVAL.raw_os_error()),
            key: Cow::Owned(format!("herd:invalid:{seq}")),
            ack: seq,
            data: None,
            sockname: None,
        }
    }
}

/// What a round-robin worker's `server.address()` returns: `{address, family, port}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sockname {
    pub address: String,
    pub family: Family,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Family {
    IPv4,
    IPv6,
}

impl From<std::net::SocketAddr> for Sockname {
    fn from(addr: std::net::SocketAddr) -> Self {
        Sockname {
            address: addr.ip().to_string(),
            family: if addr.is_ipv4() {
                Family::IPv4
            } else {
                Family::IPv6
            },
            port: addr.port(),
        }
    }
}

/// The body of a `NODE_CLUSTER` message herd sends (framing, `cmd` and `seq`, is added by
/// [`encode_cluster_message`]). The per-connection `newconn` is not here: it is written
/// by hand in [`encode_newconn`], without allocating.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum ClusterMessage<'a> {
    QueryServer(QueryServerReply<'a>),
    /// The ack a worker waits for after `exitedAfterDisconnect` (spec §5.7).
    Ack {
        ack: i64,
    },
    /// Asks a worker to close its servers and leave (graceful stop).
    Disconnect {
        act: Act,
    },
}

impl ClusterMessage<'_> {
    pub const DISCONNECT: ClusterMessage<'static> = ClusterMessage::Disconnect {
        act: Act::Disconnect,
    };
}

/// The `act` of a request herd sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Act {
    Disconnect,
}

/// Internal messages herd sends outside `NODE_CLUSTER` (no `seq`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "cmd")]
pub enum Internal<'a> {
    /// herd received the fd a worker sent (`process.send(msg, socket)`); without it the
    /// worker holds back every later message.
    #[serde(rename = "NODE_HANDLE_ACK")]
    HandleAck,
    /// Answer to `NODE_SOCKET_NOTIFY_CLOSE` (herd keeps no sockets a worker sent).
    #[serde(rename = "NODE_SOCKET_ALL_CLOSED")]
    SocketAllClosed { key: &'a str },
    /// Answer to `NODE_SOCKET_GET_COUNT`.
    #[serde(rename = "NODE_SOCKET_COUNT")]
    SocketCount { key: &'a str, count: u64 },
}

/// `{"cmd":"NODE_CLUSTER",<message's fields>,"seq":N}`.
#[derive(Serialize)]
struct Framed<'a> {
    cmd: &'static str,
    #[serde(flatten)]
    msg: &'a ClusterMessage<'a>,
    seq: u64,
}

/// `{"cmd":"NODE_HANDLE","type":"net.Native","msg":<Framed>}`: the line an fd travels with.
#[derive(Serialize)]
struct Handle<'a> {
    cmd: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    msg: Framed<'a>,
}

/// Serializes one of herd's own messages, then the newline. These types hold only strings,
/// numbers, `null` and raw JSON that was already parsed, and a `Vec` does not fail to
/// grow, so this cannot fail.
fn push_json(out: &mut Vec<u8>, msg: &impl Serialize) {
    serde_json::to_writer(&mut *out, msg).expect("herd's own Node messages always serialize");
    out.push(b'\n');
}

/// Appends `msg` as a `NODE_CLUSTER` line with `seq`.
pub fn encode_cluster_message(out: &mut Vec<u8>, msg: &ClusterMessage<'_>, seq: u64) {
    push_json(
        out,
        &Framed {
            cmd: "NODE_CLUSTER",
            msg,
            seq,
        },
    );
}

/// Appends `msg` as a `NODE_CLUSTER` message inside a `NODE_HANDLE` wrapper: the line an
/// fd travels with (a shared server's listening socket).
pub fn encode_handle_message(out: &mut Vec<u8>, msg: &ClusterMessage<'_>, seq: u64) {
    push_json(
        out,
        &Handle {
            cmd: "NODE_HANDLE",
            kind: "net.Native",
            msg: Framed {
                cmd: "NODE_CLUSTER",
                msg,
                seq,
            },
        },
    );
}

/// Appends an [`Internal`] message line.
pub fn encode_internal(out: &mut Vec<u8>, msg: &Internal<'_>) {
    push_json(out, msg);
}

/// Appends the `newconn` hand-off for `key_json` (the key already JSON-quoted). Written by
/// hand, not through serde: it runs once per connection, and this way it only copies bytes
/// into a reused buffer — no allocation, no escaping (the key was quoted once, when the
/// server was made).
pub fn encode_newconn(out: &mut Vec<u8>, key_json: &str, seq: u64) {
    out.extend_from_slice(b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{\"cmd\":\"NODE_CLUSTER\",\"act\":\"newconn\",\"key\":");
    out.extend_from_slice(key_json.as_bytes());
    out.extend_from_slice(b",\"seq\":");
    push_u64(out, seq);
    out.extend_from_slice(b"}}\n");
}

/// Appends a user message (any JSON value) as one line. The value must be valid JSON without
/// raw newlines, which serde_json output always is.
pub fn encode_user(out: &mut Vec<u8>, json: &str) {
    out.extend_from_slice(json.as_bytes());
    out.push(b'\n');
}

fn push_u64(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// JSON-quotes a string (for keys and fields built by hand).
pub fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(chunks: &[&[u8]]) -> Vec<Result<Vec<u8>, ProtoError>> {
        let mut lines = Lines::with_limit(16);
        let mut out = Vec::new();
        for chunk in chunks {
            let spare = lines.spare(chunk.len());
            let n = chunk.len();
            spare[..n].copy_from_slice(chunk);
            let len = spare.len();
            lines.filled(len, n);
            loop {
                match lines.next_line() {
                    Ok(Some(line)) => out.push(Ok(line.to_vec())),
                    Ok(None) => break,
                    Err(e) => {
                        out.push(Err(e));
                        return out;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn lines_split_across_reads() {
        let got = lines_of(&[b"{\"a\":", b"1}\n{\"b\"", b":2}\n\n"]);
        assert_eq!(
            got,
            vec![
                Ok(b"{\"a\":1}".to_vec()),
                Ok(b"{\"b\":2}".to_vec()),
                Ok(Vec::new())
            ]
        );
    }

    #[test]
    fn a_line_without_end_is_cut_off_at_the_limit() {
        let got = lines_of(&[b"0123456789", b"0123456789"]);
        assert_eq!(got, vec![Err(ProtoError::LineTooLong)]);
        let got = lines_of(&[b"01234567890123456789\n"]);
        assert_eq!(got, vec![Err(ProtoError::LineTooLong)]);
    }

    #[test]
    fn hot_path_messages() {
        assert_eq!(
            parse(br#"{"cmd":"NODE_HANDLE_ACK"}"#),
            Ok(Message::HandleAck)
        );
        assert_eq!(
            parse(br#"{"cmd":"NODE_HANDLE_NACK"}"#),
            Ok(Message::HandleNack)
        );
        assert_eq!(
            parse(br#"{"cmd":"NODE_CLUSTER","ack":2,"accepted":true,"seq":3}"#),
            Ok(Message::Reply {
                ack: 2,
                accepted: Some(true)
            })
        );
    }

    #[test]
    fn cluster_acts() {
        assert_eq!(
            parse(br#"{"cmd":"NODE_CLUSTER","act":"online","seq":0}"#),
            Ok(Message::Online)
        );
        let q = br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":null,"port":3000,"addressType":4,"backlog":false,"seq":1}"#;
        let Ok(Message::QueryServer(q)) = parse(q) else {
            panic!("queryServer")
        };
        assert_eq!(q.seq, 1);
        assert_eq!(q.port, Some(3000));
        assert_eq!(q.kind(), Ok(ServerKind::Tcp4));
        assert_eq!(q.key(), "null:3000:4:undefined:0");
        let u = br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":"127.0.0.1","port":41234,"addressType":"udp4","fd":-1,"flags":0,"seq":1}"#;
        let Ok(Message::QueryServer(u)) = parse(u) else {
            panic!("udp")
        };
        assert_eq!(u.kind(), Ok(ServerKind::Udp4));
        let p = br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":"/tmp/x.sock","port":-1,"addressType":-1,"backlog":0,"seq":1}"#;
        let Ok(Message::QueryServer(p)) = parse(p) else {
            panic!("pipe")
        };
        assert_eq!(p.kind(), Ok(ServerKind::Unix));
        let tls = br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":{"ticketKeys":"ab"},"address":null,"port":443,"addressType":4,"backlog":0,"seq":1}"#;
        let Ok(Message::QueryServer(tls)) = parse(tls) else {
            panic!("tls")
        };
        assert_eq!(
            tls.data.as_ref().map(|d| d.get()),
            Some(r#"{"ticketKeys":"ab"}"#)
        );
        assert_eq!(
            parse(br#"{"cmd":"NODE_CLUSTER","act":"close","key":"k","seq":3}"#),
            Ok(Message::Close { key: "k".into() })
        );
        assert_eq!(
            parse(br#"{"cmd":"NODE_CLUSTER","act":"exitedAfterDisconnect","seq":4}"#),
            Ok(Message::ExitedAfterDisconnect { seq: 4 })
        );
        assert_eq!(
            parse(br#"{"cmd":"NODE_CLUSTER","act":"weird","seq":4}"#),
            Ok(Message::OtherInternal)
        );
    }

    #[test]
    fn user_messages_are_anything_else() {
        for line in [
            &br#""ready""#[..],
            b"42",
            br#"{"hello":1}"#,
            br#"{"cmd":"NODEX"}"#,
            br#"{"cmd":5}"#,
            b"[1,2]",
        ] {
            match parse(line) {
                Ok(Message::User(raw)) => assert_eq!(raw.as_bytes(), line),
                other => panic!("{}: {other:?}", String::from_utf8_lossy(line)),
            }
        }
        assert!(matches!(parse(b"not json"), Err(ProtoError::NotJson(_))));
        assert!(matches!(parse(b"\xff\xfe"), Err(ProtoError::NotJson(_))));
        assert!(matches!(
            parse(br#"{"cmd":"NODE_HANDLE"}"#),
            Err(ProtoError::Malformed { .. })
        ));
    }

    /// The old hand-built framing (`encode_cluster` with a fields string), kept here to
    /// prove the typed messages put the same bytes on the wire.
    fn old_cluster(fields: &str, seq: u64) -> String {
        format!("{{\"cmd\":\"NODE_CLUSTER\",{fields},\"seq\":{seq}}}\n")
    }

    fn cluster_line(msg: &ClusterMessage<'_>, seq: u64) -> String {
        let mut out = Vec::new();
        encode_cluster_message(&mut out, msg, seq);
        String::from_utf8(out).expect("utf8")
    }

    fn internal_line(msg: &Internal<'_>) -> String {
        let mut out = Vec::new();
        encode_internal(&mut out, msg);
        String::from_utf8(out).expect("utf8")
    }

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_string()).expect("raw json")
    }

    #[test]
    fn query_server_replies_are_the_bytes_node_got_before() {
        let key = "null:3000:4:undefined:0";
        let key_json = quote(key);
        let tls = raw(r#"{"ticketKeys":"ab\u0000"}"#);
        let v4 = Sockname::from(
            "127.0.0.1:3000"
                .parse::<std::net::SocketAddr>()
                .expect("addr"),
        );
        let v6 = Sockname::from("[::]:3000".parse::<std::net::SocketAddr>().expect("addr"));
        let sockname_json = |a: &str, family: &str, port: u16| {
            format!(
                r#"{{"address":{},"family":"{family}","port":{port}}}"#,
                quote(a)
            )
        };
        // What `Server::reply_fields`, `refuse_listen` and the EINVAL replies built.
        let cases: Vec<(QueryServerReply<'_>, String)> = vec![
            (
                QueryServerReply::shared(key, 1, None),
                format!(r#""errno":0,"key":{key_json},"ack":1,"data":null"#),
            ),
            (
                QueryServerReply::shared(key, 9, Some(&tls)),
                format!(r#""errno":0,"key":{key_json},"ack":9,"data":{}"#, tls.get()),
            ),
            (
                QueryServerReply::round_robin(key, 2, None, Some(&v4)),
                format!(
                    r#""errno":null,"key":{key_json},"ack":2,"data":null,"sockname":{}"#,
                    sockname_json("127.0.0.1", "IPv4", 3000)
                ),
            ),
            (
                QueryServerReply::round_robin(key, 2, Some(&tls), Some(&v6)),
                format!(
                    r#""errno":null,"key":{key_json},"ack":2,"data":{},"sockname":{}"#,
                    tls.get(),
                    sockname_json("::", "IPv6", 3000)
                ),
            ),
            (
                QueryServerReply::round_robin("/tmp/a \"b\".sock:-1:-1:undefined:0", 3, None, None),
                format!(
                    r#""errno":null,"key":{},"ack":3,"data":null"#,
                    quote("/tmp/a \"b\".sock:-1:-1:undefined:0")
                ),
            ),
            (
                QueryServerReply::refused(-98, key, 4, Some(&tls)),
                format!(
                    r#""errno":-98,"key":{key_json},"ack":4,"data":{}"#,
                    tls.get()
                ),
            ),
            (
                QueryServerReply::invalid(5),
                format!(
                    r#""errno":{},"key":"herd:invalid:5","ack":5,"data":null"#,
                    -22
                ),
            ),
        ];
        for (reply, old_fields) in cases {
            let line = cluster_line(&ClusterMessage::QueryServer(reply.clone()), 6);
            assert_eq!(line, old_cluster(&old_fields, 6), "{reply:?}");
            // Read back by herd's own parser: a reply (`ack`, no `act`) to seq `ack`.
            assert_eq!(
                parse(line.trim_end().as_bytes()),
                Ok(Message::Reply {
                    ack: reply.ack,
                    accepted: None
                })
            );
        }
    }

    #[test]
    fn a_shared_reply_says_errno_0_and_a_round_robin_one_null() {
        let v: serde_json::Value = serde_json::from_str(
            cluster_line(
                &ClusterMessage::QueryServer(QueryServerReply::shared("k", 1, None)),
                0,
            )
            .trim_end(),
        )
        .expect("json");
        assert_eq!(v["errno"], serde_json::json!(0));
        let v: serde_json::Value = serde_json::from_str(
            cluster_line(
                &ClusterMessage::QueryServer(QueryServerReply::round_robin("k", 1, None, None)),
                0,
            )
            .trim_end(),
        )
        .expect("json");
        assert!(v.get("errno").is_some_and(serde_json::Value::is_null));
        assert!(v.get("data").is_some_and(serde_json::Value::is_null));
        assert!(v.get("sockname").is_none());
    }

    #[test]
    fn other_cluster_messages_are_the_bytes_node_got_before() {
        let ack = cluster_line(&ClusterMessage::Ack { ack: 4 }, 3);
        assert_eq!(ack, old_cluster(r#""ack":4"#, 3));
        assert_eq!(
            parse(ack.trim_end().as_bytes()),
            Ok(Message::Reply {
                ack: 4,
                accepted: None
            })
        );
        let disconnect = cluster_line(&ClusterMessage::DISCONNECT, 7);
        assert_eq!(disconnect, old_cluster(r#""act":"disconnect""#, 7));
        assert_eq!(
            parse(disconnect.trim_end().as_bytes()),
            Ok(Message::OtherInternal)
        );
    }

    #[test]
    fn a_shared_reply_travels_in_a_node_handle_wrapper() {
        let mut out = Vec::new();
        let reply = QueryServerReply::shared("k", 1, None);
        encode_handle_message(&mut out, &ClusterMessage::QueryServer(reply), 0);
        let text = String::from_utf8(out).expect("utf8");
        assert_eq!(
            text,
            "{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{\"cmd\":\"NODE_CLUSTER\",\"errno\":0,\"key\":\"k\",\"ack\":1,\"data\":null,\"seq\":0}}\n"
        );
        let Ok(Message::Handle { inner }) = parse(text.trim_end().as_bytes()) else {
            panic!("a NODE_HANDLE: {text}")
        };
        assert_eq!(
            parse(inner.as_bytes()),
            Ok(Message::Reply {
                ack: 1,
                accepted: None
            })
        );
    }

    #[test]
    fn internal_messages_are_the_bytes_node_got_before() {
        let handle_ack = internal_line(&Internal::HandleAck);
        assert_eq!(handle_ack, "{\"cmd\":\"NODE_HANDLE_ACK\"}\n");
        assert_eq!(
            parse(handle_ack.trim_end().as_bytes()),
            Ok(Message::HandleAck)
        );
        let key = "k \"quoted\" \u{1}\n";
        assert_eq!(
            internal_line(&Internal::SocketAllClosed { key }),
            format!(
                "{{\"cmd\":\"NODE_SOCKET_ALL_CLOSED\",\"key\":{}}}\n",
                quote(key)
            )
        );
        let count = internal_line(&Internal::SocketCount { key, count: 0 });
        assert_eq!(
            count,
            format!(
                "{{\"cmd\":\"NODE_SOCKET_COUNT\",\"key\":{},\"count\":0}}\n",
                quote(key)
            )
        );
        assert_eq!(
            parse(count.trim_end().as_bytes()),
            Ok(Message::OtherInternal)
        );
    }

    #[test]
    fn a_hand_off_is_a_node_handle_line() {
        let mut out = Vec::new();
        encode_newconn(&mut out, &quote("null:3000:4:undefined:0"), 12);
        let v: serde_json::Value =
            serde_json::from_slice(&out[..out.len() - 1]).expect("valid json");
        assert_eq!(v["msg"]["act"], "newconn");
        assert_eq!(v["msg"]["seq"], 12);
        assert_eq!(out.last(), Some(&b'\n'));
    }
}
