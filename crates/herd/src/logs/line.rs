//! What one output line may contain: the one place that caps a line's length and makes a
//! worker's bytes harmless to a terminal.
//!
//! Every line herd writes, worker line or event, text or JSON, passes through
//! [`text_line`] or [`json_line`], so no caller can write a longer line or a raw control
//! character. Text gets every control character (C0 but tab, DEL, C1) as a visible escape
//! (`\x1b`, `\r`, `\u009b`); JSON gets them as `\u00XX` escapes: serde escapes C0 only, and
//! a terminal acts on C1 and DEL too. The text a JSON reader decodes is unchanged.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io;

use serde::Serialize;
use serde_json::ser::{CompactFormatter, Formatter, PrettyFormatter};
use serde_json::{Map, Value};

use super::MAX_LINE;

/// The longest line herd writes, without its newline: [`MAX_LINE`] of content plus room for
/// the prefix or JSON envelope and a cut marker.
pub const MAX_OUTPUT_LINE: usize = MAX_LINE + 1024;

/// Room kept for the marker that says how much was cut.
const MARKER_ROOM: usize = 64;

fn is_control(c: char) -> bool {
    (c < ' ' && c != '\t') || ('\u{7f}'..='\u{9f}').contains(&c)
}

/// `text` with every character a terminal would act on written as a visible escape: `\r`,
/// `\n`, `\x1b` for C0 and DEL, `\u009b` for C1. Tab stays. Idempotent.
pub fn sanitize(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            c if c < ' ' || c == '\u{7f}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if is_control(c) => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Cuts `line` to at most `max` bytes (on a character boundary), ending it with a marker
/// that says how much was dropped.
pub fn cap(line: &mut String, max: usize) {
    if line.len() <= max {
        return;
    }
    let keep = line.floor_char_boundary(max.saturating_sub(MARKER_ROOM));
    let dropped = line.len() - keep;
    line.truncate(keep);
    let _ = write!(line, " … [line cut: {dropped} more bytes dropped]");
}

/// A text line as written: control characters escaped, at most [`MAX_OUTPUT_LINE`] bytes.
pub fn text_line(text: &str) -> String {
    let mut line = sanitize(text).into_owned();
    cap(&mut line, MAX_OUTPUT_LINE);
    line
}

/// A JSON object as one line of at most [`MAX_OUTPUT_LINE`] bytes: while it is longer, its
/// biggest value is cut (a value that is not a string becomes its JSON text, cut) with a
/// marker. The fields herd sets itself (`ts`, `app`, `event`, …) are short, so cutting the
/// few long values always fits.
pub fn json_line(mut obj: Map<String, Value>) -> Vec<u8> {
    for _ in 0..=obj.len() {
        let out = to_json(&obj);
        if out.len() <= MAX_OUTPUT_LINE {
            return out;
        }
        let over = out.len() - MAX_OUTPUT_LINE;
        let Some((key, size)) = obj
            .iter()
            .map(|(k, v)| (k.clone(), to_json(v).len()))
            .max_by_key(|(_, size)| *size)
        else {
            break;
        };
        if size <= MARKER_ROOM * 2 {
            break;
        }
        let budget = size.saturating_sub(over + MARKER_ROOM);
        if let Some(value) = obj.get_mut(&key) {
            *value = Value::String(cut_value(value, budget));
        }
    }
    // Unreachable with herd's own keys; stays valid and short whatever happens.
    let mut short = Map::new();
    for key in [
        "ts",
        "app",
        "event",
        "instance",
        "worker_id",
        "pid",
        "stream",
    ] {
        if let Some(v) = obj.get(key).filter(|v| to_json(v).len() <= 256) {
            short.insert(key.into(), v.clone());
        }
    }
    short.insert("message".into(), Value::String("[line cut]".into()));
    to_json(&short)
}

/// `value` (a string, or any other value as its JSON text) cut so that it serializes to
/// about `budget` bytes, with a marker.
fn cut_value(value: &Value, budget: usize) -> String {
    let text: Cow<'_, str> = match value {
        Value::String(s) => Cow::Borrowed(s),
        other => Cow::Owned(other.to_string()),
    };
    let mut used = 2; // the quotes
    let mut end = 0;
    for (i, c) in text.char_indices() {
        used += escaped_len(c);
        if used > budget {
            break;
        }
        end = i + c.len_utf8();
    }
    format!("{} … [cut: {} more bytes]", &text[..end], text.len() - end)
}

/// Bytes `c` takes inside a JSON string as [`to_json`] writes it.
fn escaped_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if c < ' ' || ('\u{7f}'..='\u{9f}').contains(&c) => 6,
        c => c.len_utf8(),
    }
}

/// Compact JSON with DEL and C1 escaped (see the module header).
pub fn to_json(value: &impl Serialize) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, Safe(CompactFormatter));
    // Maps with string keys and JSON values cannot fail to serialize.
    let _ = value.serialize(&mut ser);
    out
}

/// Pretty JSON with DEL and C1 escaped, for `herd status --json` and `herd ls --json`.
pub fn to_json_pretty(value: &impl Serialize) -> Result<String, serde_json::Error> {
    let mut out = Vec::with_capacity(1024);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, Safe(PrettyFormatter::new()));
    value.serialize(&mut ser)?;
    // serde_json writes UTF-8 only.
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A serde_json formatter that also escapes DEL and the C1 controls (U+007F–U+009F).
struct Safe<F>(F);

impl<F: Formatter> Formatter for Safe<F> {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if ('\u{7f}'..='\u{9f}').contains(&c) {
                w.write_all(&fragment.as_bytes()[start..i])?;
                write!(w, "\\u{:04x}", c as u32)?;
                start = i + c.len_utf8();
            }
        }
        w.write_all(&fragment.as_bytes()[start..])
    }

    // The layout is the inner formatter's.
    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_array(w)
    }
    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_array(w)
    }
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.0.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_array_value(w)
    }
    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_object(w)
    }
    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object(w)
    }
    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.0.begin_object_key(w, first)
    }
    fn end_object_key<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object_key(w)
    }
    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object_value(w)
    }
}

/// The last `lines` lines of `file` written after byte `from`, reading at most `max_bytes`
/// from its end: a log file that grew to gigabytes costs the same as a small one. A line cut
/// by the window is left out. Takes an open file so the caller decides how it is opened
/// (herd opens its own files through HERD_HOME's directory fd, never by a path).
pub fn file_tail(
    file: &std::fs::File,
    from: u64,
    lines: usize,
    max_bytes: u64,
) -> io::Result<Vec<String>> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    let start = from.max(len.saturating_sub(max_bytes)).min(len);
    let mut buf = vec![0; usize::try_from(len - start).unwrap_or(0)];
    let mut at = 0;
    while at < buf.len() {
        match file.read_at(&mut buf[at..], start + at as u64)? {
            0 => break,
            n => at += n,
        }
    }
    buf.truncate(at);
    let text = String::from_utf8_lossy(&buf);
    let mut all: Vec<&str> = text.lines().collect();
    if start > from && !all.is_empty() {
        all.remove(0);
    }
    let skip = all.len().saturating_sub(lines);
    Ok(all[skip..].iter().map(|l| l.to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_become_visible_escapes() {
        assert_eq!(sanitize("plain\ttab"), "plain\ttab");
        assert_eq!(
            sanitize("\x1b]0;pwned\x07 a\rb\nc\u{9b}2J\u{7f}é"),
            "\\x1b]0;pwned\\x07 a\\rb\\nc\\u009b2J\\x7fé"
        );
        let once = sanitize("\x1b[31m").into_owned();
        assert_eq!(sanitize(&once), once, "idempotent");
    }

    #[test]
    fn text_lines_are_capped_after_escaping() {
        let line = text_line(&"\x01".repeat(MAX_LINE));
        assert!(line.len() <= MAX_OUTPUT_LINE, "{}", line.len());
        assert!(line.starts_with("\\x01\\x01"));
        assert!(line.ends_with("more bytes dropped]"));
        assert!(!line.contains('\x01'));
    }

    #[test]
    fn json_lines_are_capped_and_stay_json() {
        let mut obj = Map::new();
        obj.insert("event".into(), "message".into());
        obj.insert("message".into(), Value::String("\u{1}".repeat(20_000)));
        obj.insert(
            "data".into(),
            serde_json::json!({"big": "x".repeat(500_000)}),
        );
        obj.insert("small".into(), "\u{9b}".into());
        let out = json_line(obj);
        assert!(out.len() <= MAX_OUTPUT_LINE, "{}", out.len());
        let back: Value = serde_json::from_slice(&out).expect("still JSON");
        assert_eq!(back["event"], "message");
        assert_eq!(back["small"], "\u{9b}");
        assert!(back["data"].as_str().is_some_and(|d| d.contains("[cut: ")));
        assert!(!out.windows(2).any(|w| w == [0xc2, 0x9b]), "C1 escaped");
    }

    #[test]
    fn the_tail_of_a_file_reads_only_its_end() {
        let dir = std::env::temp_dir().join(format!("herd-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("log");
        let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, &text).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        let tail = file_tail(&file, 0, 3, 100).expect("tail");
        assert_eq!(tail, ["line 997", "line 998", "line 999"]);
        let after = file_tail(&file, text.len() as u64 - 9, 15, 4096).expect("tail");
        assert_eq!(after, ["line 999"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
