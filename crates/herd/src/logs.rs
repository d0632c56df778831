//! Worker output and herd's own events, as one readable stream.
//!
//! Each worker's stdout and stderr is a pipe read by its own task ([`pump`]), cut into whole
//! lines and written with a prefix naming the app, instance and pid (`web[1] 4312 | …`), or
//! as one JSON object per line with `--log-format json`. A worker line longer than
//! [`MAX_LINE`] is cut with a marker saying how much was dropped, so a worker printing a
//! 10 MB line costs herd at most one line buffer per stream.
//!
//! Every line, worker line or event, is made in [`line`]: capped at
//! [`line::MAX_OUTPUT_LINE`] bytes and with control characters escaped, so a worker can
//! neither write a huge line through an event nor reach the terminal with an escape
//! sequence. Lines then go to [`out::Output`], a bounded queue in front of stdout (or the
//! `--log-file`, [`file`]) drained by a thread of its own: a stdout or a disk that blocks
//! never blocks the supervisor. `herd logs` without a supervisor reads the file ([`read`]).
//!
//! Colour (one per instance) only on a terminal, and never with `NO_COLOR` set.

pub mod file;
pub mod line;
pub mod out;
pub mod read;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::IsTerminal;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use herd_proto::control::LogLine;
use herd_proto::event::EventName;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::broadcast;

use self::line::{json_line, text_line};
use self::out::{Output, Sink};
use crate::spec::LogFormat;

/// Longest worker line herd writes whole (16 KiB); the rest of a longer line is dropped.
pub const MAX_LINE: usize = 16 * 1024;
/// Lines kept per worker to explain a crash.
const TAIL_LINES: usize = 40;
/// Lines kept for `herd logs`: at most this many, and at most [`RING_BYTES`] of text, so a
/// worker printing long lines cannot make the ring large.
const RING_LINES: usize = 5000;
const RING_BYTES: usize = 2 << 20;

/// Which worker a line or event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Who {
    pub instance: usize,
    pub worker_id: u64,
    pub pid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// The last lines a worker printed, kept to explain why it died.
pub type Tail = Rc<RefCell<VecDeque<String>>>;

/// Where lines go. One per app; cheap to clone.
#[derive(Clone)]
pub struct Logger {
    inner: Rc<LoggerInner>,
}

struct LoggerInner {
    app: String,
    format: LogFormat,
    color: bool,
    out: Output,
    /// Recent lines, uncoloured and escaped, for `herd logs`, and their total size.
    ring: RefCell<(VecDeque<LogLine>, usize)>,
    /// `herd logs -f` subscribers.
    follow: broadcast::Sender<LogLine>,
    /// `--http`'s `/events`: every event as its JSON line, whatever `--log-format` (see
    /// [`Logger::set_tap`]).
    tap: RefCell<Option<broadcast::Sender<std::sync::Arc<str>>>>,
}

const COLORS: [&str; 6] = ["36", "33", "35", "32", "34", "31"];

impl Logger {
    /// A logger for `app`, with the thread that writes its stdout or log file.
    pub fn new(app: &str, format: LogFormat, sink: Sink) -> std::io::Result<Self> {
        let color = format == LogFormat::Text
            && matches!(sink, Sink::Stdout)
            && std::io::stdout().is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        let (follow, _) = broadcast::channel(256);
        Ok(Logger {
            inner: Rc::new(LoggerInner {
                app: app.to_string(),
                format,
                color,
                out: Output::start(app, format, sink)?,
                ring: RefCell::new((VecDeque::with_capacity(256), 0)),
                follow,
                tap: RefCell::new(None),
            }),
        })
    }

    /// A logger that prints nothing; `recent` still has its lines (unit tests).
    #[cfg(test)]
    pub fn quiet(app: &str) -> Self {
        let (follow, _) = broadcast::channel(256);
        Logger {
            inner: Rc::new(LoggerInner {
                app: app.to_string(),
                format: LogFormat::Text,
                color: false,
                out: Output::discard(app, LogFormat::Text),
                ring: RefCell::new((VecDeque::with_capacity(256), 0)),
                follow,
                tap: RefCell::new(None),
            }),
        }
    }

    /// Every later event also goes to `tap`, while it has receivers, as one server-sent
    /// event frame (`event: NAME`, `data:` the `--log-format json` line), built once for all
    /// of them. A bounded broadcast: a slow receiver skips events, it never holds them here.
    pub fn set_tap(&self, tap: broadcast::Sender<std::sync::Arc<str>>) {
        *self.inner.tap.borrow_mut() = Some(tap);
    }

    /// The tap, if anyone listens.
    fn listening_tap(&self) -> Option<broadcast::Sender<std::sync::Arc<str>>> {
        let tap = self.inner.tap.borrow();
        tap.as_ref().filter(|t| t.receiver_count() > 0).cloned()
    }

    /// Sends an event (`json`: its JSON line) to the tap as one frame.
    fn send_to_tap(tap: &broadcast::Sender<std::sync::Arc<str>>, name: EventName, json: &[u8]) {
        let frame = format!(
            "event: {}\ndata: {}\n\n",
            name.as_str(),
            String::from_utf8_lossy(json)
        );
        let _ = tap.send(frame.into());
    }

    /// An event as the JSON object `--log-format json` writes.
    fn event_object(
        &self,
        name: EventName,
        who: Option<Who>,
        message: &str,
        fields: &[(&str, Value)],
    ) -> Map<String, Value> {
        let mut obj = Map::new();
        obj.insert("ts".into(), Value::String(timestamp()));
        obj.insert("app".into(), Value::String(self.inner.app.clone()));
        obj.insert("event".into(), Value::String(name.as_str().into()));
        if let Some(who) = who {
            obj.insert("instance".into(), who.instance.into());
            obj.insert("worker_id".into(), who.worker_id.into());
            obj.insert("pid".into(), who.pid.into());
        }
        obj.insert("message".into(), Value::String(message.to_string()));
        for (key, value) in fields {
            obj.insert((*key).to_string(), value.clone());
        }
        obj
    }

    /// herd's stdout queue, for the bounded flush at exit ([`Output::finish`]).
    pub fn output(&self) -> Output {
        self.inner.out.clone()
    }

    /// The last `n` lines (of one instance, if given) and a receiver for the lines that
    /// come after them.
    pub fn recent(
        &self,
        n: usize,
        instance: Option<usize>,
    ) -> (Vec<LogLine>, broadcast::Receiver<LogLine>) {
        let rx = self.inner.follow.subscribe();
        let ring = self.inner.ring.borrow();
        let mut lines: Vec<LogLine> = ring
            .0
            .iter()
            .rev()
            .filter(|l| instance.is_none() || l.instance == instance)
            .take(n)
            .cloned()
            .collect();
        lines.reverse();
        (lines, rx)
    }

    /// Keeps a line (already escaped and capped) for `herd logs`.
    fn remember(&self, instance: Option<usize>, text: String) {
        // The log file's writer lost lines: say so where `herd logs` readers look.
        if let Some((n, error)) = self.inner.out.take_dropped() {
            let text = text_line(&format!(
                "herd: {} {n} lines dropped: {error} (writing the log file)",
                self.inner.app
            ));
            self.keep(LogLine {
                instance: None,
                text,
            });
        }
        self.keep(LogLine { instance, text });
    }

    fn keep(&self, line: LogLine) {
        if self.inner.follow.receiver_count() > 0 {
            let _ = self.inner.follow.send(line.clone());
        }
        let mut ring = self.inner.ring.borrow_mut();
        let (lines, bytes) = &mut *ring;
        *bytes += line.text.len();
        lines.push_back(line);
        while lines.len() > RING_LINES || *bytes > RING_BYTES {
            match lines.pop_front() {
                Some(old) => *bytes -= old.text.len(),
                None => break,
            }
        }
    }

    /// One line a worker printed: waits while herd's stdout drains slowly, so the worker
    /// waits on its own pipe (see [`out`]).
    pub async fn line(&self, who: Who, stream: Stream, line: &str) {
        let plain = text_line(&format!(
            "{}[{}] {} | {line}",
            self.inner.app, who.instance, who.pid
        ));
        let mut out = match self.inner.format {
            LogFormat::Text if self.inner.color => {
                let mut out = Vec::with_capacity(plain.len() + 16);
                self.prefix(&mut out, who.instance);
                // The plain line starts with the uncoloured prefix.
                let rest = plain
                    .strip_prefix(&format!("{}[{}]", self.inner.app, who.instance))
                    .unwrap_or(&plain);
                out.extend_from_slice(rest.as_bytes());
                out
            }
            LogFormat::Text => plain.clone().into_bytes(),
            LogFormat::Json => {
                let mut obj = Map::new();
                obj.insert("ts".into(), Value::String(timestamp()));
                obj.insert("app".into(), Value::String(self.inner.app.clone()));
                obj.insert("instance".into(), who.instance.into());
                obj.insert("worker_id".into(), who.worker_id.into());
                obj.insert("pid".into(), who.pid.into());
                obj.insert("stream".into(), stream.name().into());
                obj.insert("line".into(), Value::String(line.to_string()));
                json_line(obj)
            }
        };
        out.push(b'\n');
        self.remember(Some(who.instance), plain);
        self.inner.out.line(out).await;
    }

    /// One of herd's own events. `message` is the human sentence; `fields` go to JSON only.
    /// Never waits: with herd's stdout blocked, events are dropped and counted.
    pub fn event(
        &self,
        name: EventName,
        who: Option<Who>,
        message: &str,
        fields: &[(&str, Value)],
    ) {
        let plain = text_line(&match who {
            Some(who) => format!(
                "herd: {}[{}] pid {} {message}",
                self.inner.app, who.instance, who.pid
            ),
            None => format!("herd: {} {message}", self.inner.app),
        });
        // The JSON line is built once, for the log and for the tap.
        let tap = self.listening_tap();
        let json = (self.inner.format == LogFormat::Json || tap.is_some())
            .then(|| json_line(self.event_object(name, who, message, fields)));
        let mut out = match self.inner.format {
            LogFormat::Text if self.inner.color => {
                let mut out = Vec::with_capacity(plain.len() + 32);
                out.extend_from_slice(b"\x1b[1mherd:\x1b[0m ");
                let rest = plain.strip_prefix("herd: ").unwrap_or(&plain);
                match who {
                    Some(who) => {
                        self.prefix(&mut out, who.instance);
                        let rest = rest
                            .strip_prefix(&format!("{}[{}]", self.inner.app, who.instance))
                            .unwrap_or(rest);
                        out.extend_from_slice(rest.as_bytes());
                    }
                    None => out.extend_from_slice(rest.as_bytes()),
                }
                out
            }
            LogFormat::Text => plain.clone().into_bytes(),
            LogFormat::Json => json.clone().unwrap_or_default(),
        };
        out.push(b'\n');
        self.remember(who.map(|w| w.instance), plain);
        self.inner.out.event(out);
        if let (Some(tap), Some(json)) = (tap, json) {
            Self::send_to_tap(&tap, name, &json);
        }
    }

    /// An event for tools only: written with `--log-format json`, left out of the text log
    /// because the sentence before it already said the same (`restarting` after `exited … —
    /// restarting in 100ms`).
    pub fn record(
        &self,
        name: EventName,
        who: Option<Who>,
        message: &str,
        fields: &[(&str, Value)],
    ) {
        if self.inner.format == LogFormat::Json {
            self.event(name, who, message, fields);
        } else if let Some(tap) = self.listening_tap() {
            let json = json_line(self.event_object(name, who, message, fields));
            Self::send_to_tap(&tap, name, &json);
        }
    }

    /// A worker's or the app's state changed (`from` → `to`). Written with `--log-format
    /// json` only, as a `state` event: the text log already has a sentence for each change a
    /// person needs to see, and this record is for tools and tests that follow the machine.
    pub fn transition(&self, who: Option<Who>, from: &str, to: &str, fields: &[(&str, Value)]) {
        if self.inner.format != LogFormat::Json {
            return;
        }
        let mut obj = self.event_object(EventName::State, who, "", fields);
        // A record, not a sentence: no message.
        obj.remove("message");
        obj.insert("from".into(), from.into());
        obj.insert("to".into(), to.into());
        let mut out = json_line(obj);
        out.push(b'\n');
        self.inner.out.event(out);
    }

    fn prefix(&self, out: &mut Vec<u8>, instance: usize) {
        use std::io::Write;
        let color = COLORS[instance % COLORS.len()];
        let _ = write!(out, "\x1b[{color}m{}[{instance}]\x1b[0m", self.inner.app);
    }
}

/// Reads one worker stream to its end, writing each line through `logger` and keeping the
/// last few in `tail`.
pub async fn pump(
    mut reader: impl AsyncRead + Unpin,
    logger: Logger,
    who: Who,
    stream: Stream,
    tail: Tail,
) {
    let mut chunk = vec![0u8; 16 * 1024];
    let mut cutter = LineCutter::default();
    loop {
        let n = match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut pos = 0;
        while let Some(line) = cutter.next_line(&chunk[..n], &mut pos) {
            emit(&logger, who, stream, &tail, &line).await;
        }
    }
    if let Some(line) = cutter.finish() {
        emit(&logger, who, stream, &tail, &line).await;
    }
}

async fn emit(logger: &Logger, who: Who, stream: Stream, tail: &Tail, line: &str) {
    // A chunk holds up to thousands of lines, and queueing one rarely waits: without this a
    // flooding worker's pump would keep the runtime thread from signals, timers and routing.
    tokio::task::consume_budget().await;
    {
        let mut tail = tail.borrow_mut();
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.chars().take(300).collect());
    }
    logger.line(who, stream, line).await;
}

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes, cutting longer ones.
#[derive(Default)]
struct LineCutter {
    line: Vec<u8>,
    dropped: usize,
}

impl LineCutter {
    /// The next whole line in `bytes[*pos..]`, moving `pos` past it; `None` once `bytes` is
    /// used up (an unfinished line stays here for the next chunk).
    fn next_line(&mut self, bytes: &[u8], pos: &mut usize) -> Option<String> {
        while *pos < bytes.len() {
            let rest = &bytes[*pos..];
            let (part, used, ends) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], i + 1, true),
                None => (rest, rest.len(), false),
            };
            let room = MAX_LINE - self.line.len();
            let take = part.len().min(room);
            self.line.extend_from_slice(&part[..take]);
            self.dropped += part.len() - take;
            *pos += used;
            if ends {
                return Some(self.take());
            }
        }
        None
    }

    /// What is left at the end of the stream.
    fn finish(&mut self) -> Option<String> {
        (!self.line.is_empty() || self.dropped > 0).then(|| self.take())
    }

    fn take(&mut self) -> String {
        if self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        let text = String::from_utf8_lossy(&self.line);
        let out = if self.dropped > 0 {
            format!("{text} … [line cut: {} more bytes dropped]", self.dropped)
        } else {
            text.into_owned()
        };
        self.line.clear();
        self.dropped = 0;
        if self.line.capacity() > 4 * 1024 {
            self.line.shrink_to(1024);
        }
        out
    }
}

/// Now as RFC 3339 UTC with milliseconds, e.g. `2026-11-28T15:30:00.123Z`.
pub fn timestamp() -> String {
    use std::fmt::Write;
    // humantime refuses a clock before 1970 (it panics) or after 9999 (an empty string here).
    let now = SystemTime::now().max(UNIX_EPOCH);
    let mut ts = String::with_capacity(24);
    let _ = write!(ts, "{}", humantime::format_rfc3339_millis(now));
    ts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(chunks: &[&[u8]]) -> Vec<String> {
        let mut cutter = LineCutter::default();
        let mut out = Vec::new();
        for chunk in chunks {
            let mut pos = 0;
            while let Some(line) = cutter.next_line(chunk, &mut pos) {
                out.push(line);
            }
        }
        out.extend(cutter.finish());
        out
    }

    #[test]
    fn lines_join_across_chunks() {
        assert_eq!(cut(&[b"a\nb", b"c\r\n", b"tail"]), vec!["a", "bc", "tail"]);
        assert_eq!(cut(&[b"\n"]), vec![""]);
    }

    #[test]
    fn huge_lines_are_cut_with_a_marker() {
        let big = vec![b'x'; MAX_LINE + 100];
        let out = cut(&[&big, b"\nnext\n"]);
        assert_eq!(out.len(), 2);
        assert!(out[0].starts_with("xxx"));
        assert!(out[0].ends_with("[line cut: 100 more bytes dropped]"));
        assert_eq!(out[1], "next");
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_millis() {
        let ts = timestamp();
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(ts.starts_with("20") && ts.ends_with('Z'), "{ts}");
        assert_eq!(&ts[10..11], "T", "{ts}");
        assert_eq!(&ts[19..20], ".", "{ts}");
    }
}

/// The part of a worker's last output that explains its exit: from the last line that looks
/// like an error (`Error`, `Exception`, `panicked`, `Traceback`, `error:`) on, at most a few
/// lines, else the last few lines. A Node stack trace buries its error line under ten
/// frames, so "the last N lines" alone would miss it.
pub fn explain(tail: &[String]) -> Vec<String> {
    const SHOWN: usize = 6;
    let looks_like_error = |l: &String| {
        [
            "Error",
            "Exception",
            "panicked",
            "Traceback",
            "error:",
            "FATAL",
            "fatal",
        ]
        .iter()
        .any(|w| l.contains(w))
    };
    let start = match tail
        .iter()
        .rposition(|l| looks_like_error(l) && !l.trim_start().starts_with("at "))
    {
        Some(i) => i,
        None => tail.len().saturating_sub(SHOWN),
    };
    tail[start..].iter().take(SHOWN).cloned().collect()
}

#[cfg(test)]
mod explain_tests {
    use super::explain;

    #[test]
    fn node_errors_are_found_above_their_stack() {
        let mut tail: Vec<String> = vec![
            "/app/dep.js:1".into(),
            "throw new Error('x')".into(),
            "^".into(),
            "".into(),
        ];
        tail.push("Error: broken dependency: dep-1234".into());
        for i in 0..10 {
            tail.push(format!(
                "    at Module._compile (node:internal/modules/cjs/loader:{i})"
            ));
        }
        tail.push("".into());
        tail.push("Node.js v20.20.2".into());
        let shown = explain(&tail);
        assert_eq!(shown[0], "Error: broken dependency: dep-1234");
        assert!(shown.len() <= 6);
        let plain: Vec<String> = (0..20).map(|i| format!("line {i}")).collect();
        assert_eq!(explain(&plain).last().map(String::as_str), Some("line 19"));
    }
}
