//! The vocabulary the layers share: worker and server ids, and the [`Event`]s that the
//! watcher tasks (exit waiters, IPC readers, accept loops, notify sockets, timers, signals,
//! control clients) report to the supervisor.
//!
//! It sits below the supervisor so that the low layers (`balance`, `node::channel`,
//! `health`, `control`) name what they report without importing the supervisor. The payloads
//! an event carries ([`Pending`], [`Ipc`], [`ProbeConn`]) stay with the layer that makes
//! them; this module only names them.

use std::io;
use std::process::ExitStatus;

use herd_proto::control::{Request, Response};
use herd_proto::notify::Message as Notify;
use tokio::sync::oneshot;

use crate::balance::Pending;
use crate::health::ProbeConn;
use crate::node::channel::Ipc;

/// A worker process, never reused within one supervisor's life.
pub type WorkerId = u64;

/// A server (listening socket) the app holds, never reused within one supervisor's life.
pub type ServerId = usize;

/// Something happened that the supervisor must handle.
#[derive(Debug)]
pub enum Event {
    Exited {
        id: WorkerId,
        status: io::Result<ExitStatus>,
    },
    Ipc {
        id: WorkerId,
        msg: Ipc,
    },
    IpcClosed {
        id: WorkerId,
        reason: Option<String>,
    },
    IpcWritable {
        id: WorkerId,
    },
    Notify {
        id: WorkerId,
        messages: Vec<Notify>,
        malformed: Vec<String>,
    },
    /// Connections an accept loop took in one wake-up (at most `balance::ACCEPT_BATCH`).
    Conns {
        server: ServerId,
        conns: Vec<Pending>,
    },
    AcceptFailed {
        server: ServerId,
        error: String,
    },
    /// A unix bind for a worker's `listen()` finished (see `Servers::start_bind`).
    UnixBound {
        key: String,
    },
    RestartDue {
        instance: usize,
    },
    ReadyDue {
        id: WorkerId,
    },
    ReadyTimeout {
        id: WorkerId,
    },
    KillDue {
        id: WorkerId,
        signal: rustix::process::Signal,
        /// What the worker was given time for, for the log: "--kill-timeout 5.0s", …
        after: String,
    },
    /// Once a second, when a health check or limit is on.
    Tick,
    /// `--balance sticky`: an empty slot's `--sticky-wait` is over; route again.
    Reroute,
    /// A Node probe's private connection is made: hand the served end to the worker.
    ProbeConn {
        id: WorkerId,
        conn: ProbeConn,
    },
    Probe {
        id: WorkerId,
        result: Result<u16, String>,
    },
    Signal(SignalKind),
    Control {
        request: Request,
        reply: oneshot::Sender<Response>,
    },
    /// `--http`: a question the HTTP server asks (status, metrics, readiness, samples).
    Observe(crate::http::Query),
    /// `--drain-delay` is over: the graceful stop begins.
    DrainOver,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalKind {
    Terminate,
    Interrupt,
    /// SIGHUP: rolling reload.
    Hangup,
    /// SIGTTIN: one more worker.
    MoreWorkers,
    /// SIGTTOU: one fewer worker.
    FewerWorkers,
}
