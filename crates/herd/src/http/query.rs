//! What the HTTP server asks the supervisor, and the answers: plain data, built on the
//! supervisor's loop (so an answer proves the loop runs) and turned into text here, off it.

use std::collections::BTreeMap;

use herd_proto::control::{AppStatus, Reason};
use tokio::sync::oneshot;

/// One question, with where its answer goes. The supervisor answers each at once; a query
/// whose asker went away is answered into nothing.
#[derive(Debug)]
pub enum Query {
    /// `/live` and `/ready`: cheap, no /proc reads.
    Readiness(oneshot::Sender<Readiness>),
    /// `/status`: the `herd status --json` document.
    Status(oneshot::Sender<Box<AppStatus>>),
    /// `/metrics`.
    Metrics(oneshot::Sender<Box<Snapshot>>),
    /// `/samples`: the 1 s CPU and memory ring, as JSON text.
    Samples(oneshot::Sender<String>),
}

/// Whether the app takes traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// Slots whose current worker is ready.
    pub ready: usize,
    pub desired: usize,
    /// `--drain-delay` running, or stopping: not ready whatever the workers.
    pub stopping: bool,
}

/// Everything `/metrics` shows, read once on the loop.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub app: String,
    pub workers: Vec<WorkerMetrics>,
    pub slots: Vec<SlotMetrics>,
    /// Worker records by the state `herd status` shows (empty slots included).
    pub states: BTreeMap<&'static str, u64>,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub supervisor_rss_bytes: u64,
    pub supervisor_cpu_seconds: f64,
    /// Round-robin: herd hands every connection over, so it can count them.
    pub counts_connections: bool,
}

/// One worker process herd runs.
#[derive(Debug, Clone, Default)]
pub struct WorkerMetrics {
    pub instance: usize,
    pub worker_id: u64,
    pub ready: bool,
    pub rss_bytes: u64,
    pub cpu_seconds: f64,
    pub connections: u64,
    /// Seconds since the epoch.
    pub start_time: f64,
}

/// One slot: counters that outlive its workers.
#[derive(Debug, Clone, Default)]
pub struct SlotMetrics {
    pub instance: usize,
    /// Its current worker, if it has one.
    pub worker_id: Option<u64>,
    pub restarts_by_reason: BTreeMap<Reason, u32>,
    pub probe_failures: u64,
}
