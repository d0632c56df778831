//! The names of herd's own log events (`"event"` in `--log-format json`), one list for the
//! supervisor, the JSON log and the tools that read it.

use serde::{Deserialize, Serialize};

use crate::control::wire_enum;

wire_enum! {
    /// One of herd's events.
    pub enum EventName {
        /// Every slot's worker is ready.
        AllReady = "all_ready",
        /// herd listens on an address.
        Bound = "bound",
        /// A worker's message went to the others.
        Broadcast = "broadcast",
        /// herd closed a server the app closed.
        Closed = "closed",
        /// Connections every worker refused were closed.
        ConnClosed = "conn_closed",
        /// A control client sent something herd refused.
        ControlError = "control_error",
        /// A worker leaves on its own (`cluster.worker.disconnect()`).
        Disconnecting = "disconnecting",
        Error = "error",
        /// A slot gave up, or every slot did.
        Errored = "errored",
        /// A worker was reaped (`code`, `signal`, `expected`, `reason`).
        Exited = "exited",
        HandoffFailed = "handoff_failed",
        /// Probes pass again after failures.
        Healthy = "healthy",
        /// `--http` serves on an address (`address`).
        Http = "http",
        /// The watchdog found a worker hung.
        Hung = "hung",
        IpcDropped = "ipc_dropped",
        IpcError = "ipc_error",
        /// herd escalated a stop with a signal.
        Kill = "kill",
        ListenError = "listen_error",
        /// A worker's `process.send()` message.
        Message = "message",
        /// A worker reported an errno on its notify socket.
        Notify = "notify",
        NotifyError = "notify_error",
        /// A Node worker's `online`.
        Online = "online",
        /// A reload, restart, scale or replacement failed.
        OpFailed = "op_failed",
        ProbeFailed = "probe_failed",
        Ready = "ready",
        ReadyTimeout = "ready_timeout",
        /// An operation was refused (another is running).
        Refused = "refused",
        /// Socket activation, `shared`: herd starts (`active`) or stops refusing connections
        /// while no worker is ready.
        Refusing = "refusing",
        /// A reload finished.
        Reload = "reload",
        Reloading = "reloading",
        /// A health replacement finished.
        Replace = "replace",
        /// A worker will be replaced (`reason`).
        Replacing = "replacing",
        /// A restart finished.
        Restart = "restart",
        Restarting = "restarting",
        /// A scale finished.
        Scale = "scale",
        Scaling = "scaling",
        SpawnFailed = "spawn_failed",
        Spawned = "spawned",
        Starting = "starting",
        /// A worker's or the app's state changed (`from`, `to`); JSON logs only.
        State = "state",
        /// `--balance sticky`: a slot without a ready worker for `--sticky-wait`; its clients
        /// go to their next slots.
        StickyMoved = "sticky_moved",
        Stopped = "stopped",
        Stopping = "stopping",
        /// A ready worker said it cannot serve for now (`process.send({herd: 'unready'})`).
        Unready = "unready",
        Warning = "warning",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_serialise_as_their_strings_and_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for name in EventName::ALL {
            let json = serde_json::to_string(name).expect("json");
            assert_eq!(json, format!("\"{}\"", name.as_str()));
            assert!(seen.insert(name.as_str()), "{name} twice");
            let back: EventName = serde_json::from_str(&json).expect("parse");
            assert_eq!(back, *name);
        }
    }
}
