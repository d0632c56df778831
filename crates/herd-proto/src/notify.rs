//! systemd-style notify datagrams: `READY=1`, `STATUS=…`, `WATCHDOG=1`, …
//!
//! A worker tells its supervisor how it is doing by sending one unix datagram to the path
//! (or abstract name) in `NOTIFY_SOCKET`. The datagram is a list of `KEY=VALUE` lines
//! separated by `\n`, as `sd_notify(3)` defines. This module turns such a datagram into a
//! list of [`Message`]s and back; sending and receiving are left to the caller.
//!
//! # Parsing is forgiving, per line
//!
//! A datagram comes from a process herd does not trust to be well written, so one bad line
//! must not cost the good ones: [`parse`] keeps every line it understands, reports each
//! malformed line (no `=`, not UTF-8, a known key with a bad value) in
//! [`Parsed::malformed`] so the supervisor can log it, and silently skips keys it does not
//! know (`FDSTORE=1`, `EXTEND_TIMEOUT_USEC=…`, …), as systemd skips keys newer than itself.
//! Only a datagram larger than [`MAX_DATAGRAM`] is rejected whole.
//!
//! # Receiving
//!
//! Receive into a buffer of `MAX_DATAGRAM + 1` bytes: a datagram that fills it was truncated
//! by the kernel and [`parse`] rejects it, instead of acting on a cut-off `STATUS=` line.

use std::fmt;

/// The largest datagram a worker may send, in bytes (systemd uses the same bound, `PIPE_BUF`).
pub const MAX_DATAGRAM: usize = 4096;

/// Longest excerpt of a malformed line kept in [`Malformed::line`], in bytes.
const EXCERPT_MAX: usize = 80;

/// One notification a worker sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `READY=1`: the worker serves; route connections to it.
    Ready,
    /// `STATUS=text`: free-form status for humans (`herd status`). Single line.
    Status(String),
    /// `WATCHDOG=1`: keep-alive, expected at least every `WATCHDOG_USEC` µs when that is set.
    Watchdog,
    /// `STOPPING=1`: the worker is shutting down on its own.
    Stopping,
    /// `RELOADING=1`: the worker is reloading its configuration.
    Reloading,
    /// `MAINPID=pid`: the real server process, when the worker is a wrapper. Never 0.
    MainPid(u32),
    /// `ERRNO=n`: the worker failed with this errno (non-negative).
    Errno(i32),
}

impl fmt::Display for Message {
    /// Formats the message as its `KEY=VALUE` line, without the trailing newline.
    ///
    /// A `STATUS` text has its control characters (newlines included) replaced by spaces,
    /// since a newline would start a new `KEY=VALUE` line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Ready => f.write_str("READY=1"),
            Message::Status(text) => {
                f.write_str("STATUS=")?;
                for c in text.chars() {
                    let c = if c.is_control() { ' ' } else { c };
                    fmt::Write::write_char(f, c)?;
                }
                Ok(())
            }
            Message::Watchdog => f.write_str("WATCHDOG=1"),
            Message::Stopping => f.write_str("STOPPING=1"),
            Message::Reloading => f.write_str("RELOADING=1"),
            Message::MainPid(pid) => write!(f, "MAINPID={pid}"),
            Message::Errno(errno) => write!(f, "ERRNO={errno}"),
        }
    }
}

/// A datagram that cannot be sent or was not accepted as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// Over [`MAX_DATAGRAM`] bytes (or truncated by the kernel to exactly one byte more).
    #[error("notify datagram of {len} bytes is over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
}

/// Why one line of a datagram was skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("not UTF-8")]
    NotUtf8,
    #[error("no '=' between key and value")]
    NoEquals,
    #[error("{key} must be 1, got {value:?}")]
    NotOne { key: &'static str, value: String },
    #[error("{key} must be a positive number, got {value:?}")]
    BadPid { key: &'static str, value: String },
    #[error("{key} must be a non-negative number, got {value:?}")]
    BadErrno { key: &'static str, value: String },
}

/// A line [`parse`] skipped, for the supervisor's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// 1-based line number in the datagram.
    pub line_no: usize,
    /// The line, cut to its first 80 bytes and lossily decoded.
    pub line: String,
    pub error: LineError,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {} {:?}: {}", self.line_no, self.line, self.error)
    }
}

/// What a datagram said: the messages in order, and the lines that were skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub messages: Vec<Message>,
    pub malformed: Vec<Malformed>,
}

/// Parses one datagram. Empty lines and unknown keys are skipped silently; malformed lines
/// are skipped and listed in [`Parsed::malformed`].
pub fn parse(datagram: &[u8]) -> Result<Parsed, DatagramError> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(DatagramError::TooLarge {
            len: datagram.len(),
            max: MAX_DATAGRAM,
        });
    }
    let mut parsed = Parsed::default();
    for (i, raw) in datagram.split(|&b| b == b'\n').enumerate() {
        if raw.is_empty() {
            continue;
        }
        match parse_line(raw) {
            Ok(Some(message)) => parsed.messages.push(message),
            Ok(None) => {}
            Err(error) => parsed.malformed.push(Malformed {
                line_no: i + 1,
                line: excerpt(raw),
                error,
            }),
        }
    }
    Ok(parsed)
}

/// Parses one `KEY=VALUE` line (without its newline). `Ok(None)` for a key herd ignores.
pub fn parse_line(line: &[u8]) -> Result<Option<Message>, LineError> {
    let line = std::str::from_utf8(line).map_err(|_| LineError::NotUtf8)?;
    let (key, value) = line.split_once('=').ok_or(LineError::NoEquals)?;
    let message = match key {
        "READY" => one("READY", value, Message::Ready)?,
        "WATCHDOG" => one("WATCHDOG", value, Message::Watchdog)?,
        "STOPPING" => one("STOPPING", value, Message::Stopping)?,
        "RELOADING" => one("RELOADING", value, Message::Reloading)?,
        "STATUS" => Message::Status(value.to_owned()),
        "MAINPID" => match value.parse::<u32>() {
            Ok(pid) if pid > 0 && is_decimal(value) => Message::MainPid(pid),
            _ => {
                return Err(LineError::BadPid {
                    key: "MAINPID",
                    value: value.to_owned(),
                })
            }
        },
        "ERRNO" => match value.parse::<i32>() {
            Ok(errno) if errno >= 0 && is_decimal(value) => Message::Errno(errno),
            _ => {
                return Err(LineError::BadErrno {
                    key: "ERRNO",
                    value: value.to_owned(),
                })
            }
        },
        _ => return Ok(None),
    };
    Ok(Some(message))
}

/// Formats messages as one datagram: their lines joined by `\n` (see [`Message`]'s `Display`
/// for how a `STATUS` text is sanitized).
pub fn encode(messages: &[Message]) -> Result<String, DatagramError> {
    let mut out = String::new();
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&message.to_string());
    }
    if out.len() > MAX_DATAGRAM {
        return Err(DatagramError::TooLarge {
            len: out.len(),
            max: MAX_DATAGRAM,
        });
    }
    Ok(out)
}

fn one(key: &'static str, value: &str, message: Message) -> Result<Message, LineError> {
    if value == "1" {
        Ok(message)
    } else {
        Err(LineError::NotOne {
            key,
            value: value.to_owned(),
        })
    }
}

/// `str::parse` accepts a leading `+`; the wire format is plain digits.
fn is_decimal(value: &str) -> bool {
    value.bytes().all(|b| b.is_ascii_digit())
}

fn excerpt(raw: &[u8]) -> String {
    let cut = &raw[..raw.len().min(EXCERPT_MAX)];
    String::from_utf8_lossy(cut).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(datagram: &str) -> Vec<Message> {
        parse(datagram.as_bytes()).expect("within bounds").messages
    }

    #[test]
    fn parses_every_known_key() {
        let got = messages(
            "READY=1\nSTATUS=serving 3 clients\nWATCHDOG=1\nSTOPPING=1\nRELOADING=1\n\
             MAINPID=4242\nERRNO=98",
        );
        assert_eq!(
            got,
            vec![
                Message::Ready,
                Message::Status("serving 3 clients".into()),
                Message::Watchdog,
                Message::Stopping,
                Message::Reloading,
                Message::MainPid(4242),
                Message::Errno(98),
            ]
        );
    }

    #[test]
    fn skips_unknown_keys_and_empty_lines_silently() {
        let parsed =
            parse(b"\nFDSTORE=1\nREADY=1\n\nEXTEND_TIMEOUT_USEC=5000000\n").expect("within bounds");
        assert_eq!(parsed.messages, vec![Message::Ready]);
        assert!(parsed.malformed.is_empty());
    }

    #[test]
    fn keeps_good_lines_around_malformed_ones() {
        let parsed =
            parse(b"garbage\nREADY=1\nMAINPID=abc\n\xff\xfe=1\nSTATUS=ok").expect("within bounds");
        assert_eq!(
            parsed.messages,
            vec![Message::Ready, Message::Status("ok".into())]
        );
        let errors: Vec<_> = parsed
            .malformed
            .iter()
            .map(|m| (m.line_no, &m.error))
            .collect();
        assert_eq!(
            errors,
            vec![
                (1, &LineError::NoEquals),
                (
                    3,
                    &LineError::BadPid {
                        key: "MAINPID",
                        value: "abc".into()
                    }
                ),
                (4, &LineError::NotUtf8),
            ]
        );
    }

    #[test]
    fn flags_must_be_exactly_one() {
        for line in [
            "READY=0",
            "READY=",
            "READY=true",
            "WATCHDOG=trigger",
            "STOPPING=11",
        ] {
            let parsed = parse(line.as_bytes()).expect("within bounds");
            assert!(parsed.messages.is_empty(), "{line}");
            assert!(
                matches!(parsed.malformed[0].error, LineError::NotOne { .. }),
                "{line}"
            );
        }
    }

    #[test]
    fn numbers_are_plain_digits_in_range() {
        for line in [
            "MAINPID=0",
            "MAINPID=-1",
            "MAINPID=+5",
            "MAINPID=4294967296",
            "MAINPID=",
        ] {
            assert!(messages(line).is_empty(), "{line}");
        }
        for line in ["ERRNO=-1", "ERRNO=+2", "ERRNO=2147483648", "ERRNO=x"] {
            assert!(messages(line).is_empty(), "{line}");
        }
        assert_eq!(messages("ERRNO=0"), vec![Message::Errno(0)]);
    }

    #[test]
    fn status_keeps_everything_after_the_first_equals() {
        assert_eq!(
            messages("STATUS=a=b c"),
            vec![Message::Status("a=b c".into())]
        );
        assert_eq!(messages("STATUS="), vec![Message::Status(String::new())]);
    }

    #[test]
    fn rejects_datagrams_over_the_limit() {
        let big = vec![b'x'; MAX_DATAGRAM + 1];
        assert_eq!(
            parse(&big),
            Err(DatagramError::TooLarge {
                len: MAX_DATAGRAM + 1,
                max: MAX_DATAGRAM
            })
        );
        assert!(parse(&big[..MAX_DATAGRAM]).is_ok());
    }

    #[test]
    fn malformed_lines_are_cut_for_the_log() {
        let long = "x".repeat(500);
        let parsed = parse(long.as_bytes()).expect("within bounds");
        assert_eq!(parsed.malformed[0].line.len(), EXCERPT_MAX);
        assert_eq!(
            parsed.malformed[0].to_string(),
            format!(
                "line 1 {:?}: no '=' between key and value",
                "x".repeat(EXCERPT_MAX)
            )
        );
    }

    #[test]
    fn encode_joins_lines_and_round_trips() {
        let sent = vec![
            Message::Ready,
            Message::Status("up".into()),
            Message::MainPid(7),
            Message::Errno(0),
            Message::Watchdog,
            Message::Stopping,
            Message::Reloading,
        ];
        let datagram = encode(&sent).expect("within bounds");
        assert_eq!(
            datagram,
            "READY=1\nSTATUS=up\nMAINPID=7\nERRNO=0\nWATCHDOG=1\nSTOPPING=1\nRELOADING=1"
        );
        assert_eq!(messages(&datagram), sent);
        assert_eq!(encode(&[]).expect("within bounds"), "");
    }

    #[test]
    fn encode_keeps_status_on_one_line() {
        let datagram = encode(&[
            Message::Status("two\nlines\r\tand tab".into()),
            Message::Ready,
        ])
        .expect("within bounds");
        assert_eq!(datagram, "STATUS=two lines  and tab\nREADY=1");
        assert_eq!(messages(&datagram).len(), 2);
    }

    #[test]
    fn encode_refuses_oversized_datagrams() {
        let status = Message::Status("x".repeat(MAX_DATAGRAM));
        assert!(matches!(
            encode(&[status]),
            Err(DatagramError::TooLarge { .. })
        ));
    }
}
