//! The control protocol between `herd <command>` and a running supervisor.
//!
//! One JSON object per line over the app's unix control socket (`HERD_HOME/<name>.sock`,
//! mode 0600, peer uid checked). The client sends one [`Request`]; the supervisor answers
//! with one [`Response`] when the operation has an outcome (a reload answers once every
//! worker runs the new code, or once it failed). `logs` with `follow` keeps streaming
//! [`LogLine`]s after the response until the client hangs up.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Rolling replacement of every worker, `parallel` slots at a time.
    Reload {
        parallel: usize,
    },
    /// Stop every worker, then start them again.
    Restart,
    /// `to` is `N`, `+K` or `-K`.
    Scale {
        to: String,
    },
    Stop,
    Logs {
        lines: usize,
        follow: bool,
        instance: Option<usize>,
    },
    /// A JSON message to every worker's `process.on('message')`, or one instance's.
    Send {
        data: serde_json::Value,
        instance: Option<usize>,
    },
    /// A rolling reload onto a new `herd run` argv (`herd apply`): the supervisor parses
    /// `args` as `herd run` would, refuses what a reload cannot change (listen addresses,
    /// balance mode, name, user), and keeps its old spec if the reload rolls back.
    Reconfigure {
        parallel: usize,
        args: Vec<String>,
    },
    /// Replace one slot's worker gracefully: a new one starts, and once it is ready the old
    /// one stops (one step of a reload). `herd restart NAME --instance N`, monit's `R`.
    RestartWorker {
        instance: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// What happened, for a person.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AppStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<LogLine>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Self {
        Response {
            ok: true,
            message: message.into(),
            status: None,
            lines: Vec::new(),
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Response {
            ok: false,
            message: message.into(),
            status: None,
            lines: Vec::new(),
        }
    }
}

/// One app, as `herd status --json` prints it. Field names are stable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppStatus {
    pub name: String,
    pub state: AppState,
    pub balance: String,
    /// `node` or `socket-activation`.
    pub kind: String,
    pub pid: u32,
    pub uptime_ms: u64,
    pub desired: usize,
    pub ready: usize,
    pub restarts: u32,
    /// Sum over the workers, percent of one core.
    pub cpu_percent: f64,
    /// Sum over the workers, bytes.
    pub memory_bytes: u64,
    /// herd's own resident memory, bytes.
    pub supervisor_memory_bytes: u64,
    pub listen: Vec<String>,
    pub workers: Vec<WorkerStatus>,
    /// The herd.toml the app was started from (absolute path); none for the command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// The `herd run` arguments the running workers were started with (after `run`).
    #[serde(default)]
    pub args: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub instance: usize,
    pub worker_id: u64,
    pub pid: u32,
    pub state: WorkerState,
    pub uptime_ms: u64,
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    pub cpu_percent: f64,
    pub memory_bytes: u64,
    /// Connections herd handed to it (round-robin, sticky).
    pub connections: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_text: Option<String>,
    /// The last health probe: `ok (200)`, `failing 2/3: status 500`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// Replacements of this slot by reason.
    #[serde(default)]
    pub restarts_by_reason: std::collections::BTreeMap<Reason, u32>,
}

/// Defines a wire enum whose values are fixed strings (snake_case), with `as_str` and
/// `Display` giving the same string as JSON.
macro_rules! wire_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)*
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use wire_enum;

wire_enum! {
    /// The app's state in `herd status` (`AppStatus.state`).
    pub enum AppState {
        /// Serving, nothing in progress.
        Running = "running",
        Reloading = "reloading",
        Restarting = "restarting",
        Scaling = "scaling",
        /// One worker replaced for a health reason.
        Replacing = "replacing",
        /// Running, but every slot gave up (herd is about to exit 1).
        Errored = "errored",
        Stopping = "stopping",
    }
}

wire_enum! {
    /// A worker slot's state in `herd status` (`WorkerStatus.state`).
    pub enum WorkerState {
        /// Started, not ready yet.
        Starting = "starting",
        Ready = "ready",
        /// Asked to stop, or on its way out after a reload or scale-down.
        Stopping = "stopping",
        /// No worker: the slot gave up (see `last_exit`).
        Errored = "errored",
        /// No worker: a restart is due after a backoff.
        Waiting = "waiting",
        /// Ready before, out of rotation at its own request (`status_text`: why).
        Unready = "unready",
        /// Found hung (`--watchdog`): out of routing, being replaced and stopped.
        Hung = "hung",
    }
}

wire_enum! {
    /// Why a slot's worker was replaced (`restarts_by_reason` keys, the `reason` of
    /// `hung` and `replacing` events). Declared in alphabetical order, so a map of them
    /// lists them as a map of their names would.
    pub enum Reason {
        /// `--max-age`.
        Age = "age",
        /// It exited on its own.
        Crash = "crash",
        /// `--watchdog`.
        Hung = "hung",
        /// `--max-memory`.
        Memory = "memory",
        Reload = "reload",
        /// `--max-requests`.
        Requests = "requests",
        /// `--health-check` failed.
        Unhealthy = "unhealthy",
    }
}

/// One line of the supervisor's log ring.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// The worker slot, or none for herd's own events.
    pub instance: Option<usize>,
    pub text: String,
}

/// Longest request line the supervisor reads (the newline included).
pub const MAX_REQUEST: usize = 1 << 20;

/// Where a request line stands in the bytes read from a client so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// No newline yet and still room for one: read more.
    Incomplete,
    /// The request line, without its newline (also what a client sent before hanging up).
    Line(&'a [u8]),
    /// [`MAX_REQUEST`] bytes and no newline: the request is refused unread.
    TooLong,
}

/// Finds the request line in `buf` (everything read so far; `eof` once the client has
/// finished sending). The supervisor never keeps more than [`MAX_REQUEST`] bytes of a
/// request: a longer one is [`Frame::TooLong`] as soon as that many bytes lack a newline.
pub fn frame(buf: &[u8], eof: bool) -> Frame<'_> {
    let window = &buf[..buf.len().min(MAX_REQUEST)];
    match window.iter().position(|&b| b == b'\n') {
        Some(end) => Frame::Line(&window[..end]),
        None if buf.len() >= MAX_REQUEST => Frame::TooLong,
        None if eof => Frame::Line(buf),
        None => Frame::Incomplete,
    }
}

/// Why a request line was refused, in words for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("bad request: not UTF-8 text (invalid byte at offset {0}); send one JSON object per line, like {{\"cmd\":\"status\"}}")]
    NotUtf8(usize),
    #[error("bad request: {0}; send one JSON object per line, like {{\"cmd\":\"status\"}}")]
    Json(String),
    #[error("bad request: longer than {MAX_REQUEST} bytes without a newline")]
    TooLong,
}

/// Parses one request line (see [`frame`]: shorter than [`MAX_REQUEST`]); a trailing `\r`
/// and spaces are ignored.
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    if line.len() >= MAX_REQUEST {
        return Err(RequestError::TooLong);
    }
    let text = std::str::from_utf8(line).map_err(|e| RequestError::NotUtf8(e.valid_up_to()))?;
    serde_json::from_str(text.trim_end()).map_err(|e| RequestError::Json(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_by_cmd() {
        let r: Request = serde_json::from_str(r#"{"cmd":"scale","to":"+2"}"#).expect("parse");
        assert_eq!(r, Request::Scale { to: "+2".into() });
        let text = serde_json::to_string(&Request::Reload { parallel: 1 }).expect("json");
        assert_eq!(text, r#"{"cmd":"reload","parallel":1}"#);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
        let text = serde_json::to_string(&Request::RestartWorker { instance: 2 }).expect("json");
        assert_eq!(text, r#"{"cmd":"restart_worker","instance":2}"#);
    }

    #[test]
    fn a_request_line_is_framed_and_bounded() {
        assert_eq!(frame(b"{}\nrest", false), Frame::Line(b"{}"));
        assert_eq!(frame(b"{\"cmd\"", false), Frame::Incomplete);
        assert_eq!(frame(b"{\"cmd\"", true), Frame::Line(b"{\"cmd\""));
        assert_eq!(frame(&vec![b' '; MAX_REQUEST], false), Frame::TooLong);
        let mut long = vec![b' '; MAX_REQUEST];
        long.push(b'\n');
        assert_eq!(frame(&long, false), Frame::TooLong);
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        assert_eq!(
            parse_request(b"{\"cmd\":\"status\"}\r"),
            Ok(Request::Status)
        );
        let err = parse_request(b"\xff\xfe").expect_err("not UTF-8");
        assert!(err.to_string().contains("not UTF-8"), "{err}");
        let err = parse_request(b"{\"cmd\":\"explode\"}").expect_err("unknown");
        assert!(err.to_string().contains("explode"), "{err}");
    }

    #[test]
    fn states_and_reasons_are_todays_strings() {
        let text = |v: &dyn erased::Json| v.json();
        assert_eq!(text(&AppState::Reloading), r#""reloading""#);
        assert_eq!(text(&WorkerState::Waiting), r#""waiting""#);
        for r in Reason::ALL {
            assert_eq!(text(r), format!("\"{r}\""));
        }
        // Map keys: a map of reasons reads as a map of their names, in the same order.
        let by_reason: std::collections::BTreeMap<Reason, u32> =
            Reason::ALL.iter().map(|&r| (r, 1)).collect();
        let json = serde_json::to_string(&by_reason).expect("json");
        let by_name: std::collections::BTreeMap<String, u32> =
            serde_json::from_str(&json).expect("names");
        assert_eq!(serde_json::to_string(&by_name).expect("json"), json);
        let back: std::collections::BTreeMap<Reason, u32> =
            serde_json::from_str(&json).expect("reasons");
        assert_eq!(back, by_reason);
    }

    mod erased {
        pub trait Json {
            fn json(&self) -> String;
        }
        impl<T: serde::Serialize> Json for T {
            fn json(&self) -> String {
                serde_json::to_string(self).expect("json")
            }
        }
    }

    #[test]
    fn responses_omit_empty_parts() {
        let text = serde_json::to_string(&Response::ok("done")).expect("json");
        assert_eq!(text, r#"{"ok":true,"message":"done"}"#);
    }
}
