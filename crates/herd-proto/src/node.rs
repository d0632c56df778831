//! Node.js cluster IPC messages (specs/node-cluster-protocol.md) in JSON serialization mode.
//!
//! The channel is a byte stream of `JSON + "\n"` lines. [`Lines`] splits it with a hard
//! limit on line length, so a worker that never sends a newline cannot grow herd's memory.
//! [`parse`] classifies one line without allocating for the messages on the round-robin hot
//! path (`NODE_HANDLE_ACK` and the `{ack, accepted}` reply): they are deserialized into
//! borrowed fields. The `encode_*` functions append exact wire bytes to a reusable buffer.
//!
//! A message is *internal* when it is an object whose `cmd` is a string starting with
//! `NODE_` (and longer than 5 characters); anything else is a user message. Node decides
//! this on the top-level value only (`isInternal` in `lib/internal/child_process.js`), and
//! acts on internal messages instead of showing them to the app, so herd never sends a user
//! message that [`is_internal`] accepts: a worker's broadcast or `herd send` data could
//! otherwise tell every worker `{"cmd":"NODE_CLUSTER","act":"disconnect"}`.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde::Deserialize;
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

/// Appends `{"cmd":"NODE_CLUSTER",<fields>,"seq":N}\n`; `fields` is a JSON object body
/// without braces (may be empty).
pub fn encode_cluster(out: &mut Vec<u8>, fields: &str, seq: u64) {
    out.extend_from_slice(b"{\"cmd\":\"NODE_CLUSTER\",");
    if !fields.is_empty() {
        out.extend_from_slice(fields.as_bytes());
        out.push(b',');
    }
    push_seq_end(out, seq);
}

/// Appends a `NODE_HANDLE` wrapper around a cluster message: the line an fd travels with.
pub fn encode_handle(out: &mut Vec<u8>, fields: &str, seq: u64) {
    out.extend_from_slice(b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":");
    encode_cluster(out, fields, seq);
    // encode_cluster ended the inner object with "}\n": close the wrapper before the newline.
    out.pop();
    out.extend_from_slice(b"}\n");
}

/// Appends the `newconn` hand-off for `key_json` (the key already JSON-quoted).
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

fn push_seq_end(out: &mut Vec<u8>, seq: u64) {
    out.extend_from_slice(b"\"seq\":");
    push_u64(out, seq);
    out.extend_from_slice(b"}\n");
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

    #[test]
    fn encodings_are_node_lines() {
        let mut out = Vec::new();
        encode_cluster(&mut out, r#""act":"disconnect""#, 7);
        assert_eq!(
            out,
            br#"{"cmd":"NODE_CLUSTER","act":"disconnect","seq":7}"#
                .iter()
                .chain(b"\n")
                .copied()
                .collect::<Vec<_>>()
        );
        out.clear();
        encode_handle(&mut out, r#""errno":0,"key":"k","ack":1,"data":null"#, 0);
        let text = String::from_utf8(out.clone()).expect("utf8");
        assert_eq!(
            text,
            "{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{\"cmd\":\"NODE_CLUSTER\",\"errno\":0,\"key\":\"k\",\"ack\":1,\"data\":null,\"seq\":0}}\n"
        );
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).expect("valid json");
        assert_eq!(v["msg"]["key"], "k");
        out.clear();
        encode_newconn(&mut out, &quote("null:3000:4:undefined:0"), 12);
        let v: serde_json::Value =
            serde_json::from_slice(&out[..out.len() - 1]).expect("valid json");
        assert_eq!(v["msg"]["act"], "newconn");
        assert_eq!(v["msg"]["seq"], 12);
        assert_eq!(out.last(), Some(&b'\n'));
    }
}
