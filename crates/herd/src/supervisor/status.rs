//! `herd status`: the app and its workers as facts (`AppStatus`), with CPU and memory from
//! /proc. CPU is the average since the worker started for the first reading and since the
//! previous reading after that.

use std::collections::BTreeMap;

use herd_proto::control::{AppState, AppStatus, Reason, WorkerState as Shown, WorkerStatus};

use super::worker::Worker;
use super::{Slot, Supervisor};
use crate::os::Os;
use crate::procfs::CpuSample;
use crate::spec::WorkerKind;

impl Supervisor {
    pub(super) fn status(&mut self) -> AppStatus {
        let mut workers = Vec::new();
        for (instance, slot) in self.slots.iter().enumerate() {
            let before = workers.len();
            for id in [slot.worker, slot.incoming].into_iter().flatten() {
                if let Some(w) = self.workers.get_mut(&id) {
                    workers.push(worker_status(&*self.os, w, instance, slot));
                }
            }
            if workers.len() == before {
                workers.push(empty_slot_status(instance, slot));
            }
        }
        // Workers on their way out after a reload or scale-down.
        for w in self.workers.values() {
            let current = self
                .slots
                .get(w.instance)
                .is_some_and(|s| s.worker == Some(w.id) || s.incoming == Some(w.id));
            if !current {
                workers.push(leaving_status(&*self.os, w));
            }
        }
        let me = std::process::id();
        AppStatus {
            name: self.plan.spec.name.clone(),
            state: self.app_state(),
            balance: self.plan.balance.to_string(),
            kind: match self.plan.kind {
                WorkerKind::Node => "node".into(),
                WorkerKind::SocketActivation => "socket-activation".into(),
            },
            pid: me,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            desired: self.live_slots(),
            ready: self.ready_slots(),
            restarts: self.slots.iter().map(|s| s.restarts).sum(),
            cpu_percent: (workers.iter().map(|w| w.cpu_percent).sum::<f64>() * 10.0).round() / 10.0,
            memory_bytes: workers.iter().map(|w| w.memory_bytes).sum(),
            supervisor_memory_bytes: self.os.rss_bytes(me).unwrap_or(0),
            listen: self.listen_addresses(),
            workers,
            config: self.origin().config.clone(),
            args: self.origin().args.clone(),
        }
    }

    /// The phase, or `errored` while running with every slot given up.
    fn app_state(&self) -> AppState {
        match self.phase.op() {
            _ if self.winding_down() => AppState::Stopping,
            Some(op) => op.kind.state(),
            None if self.slots.iter().all(|s| s.state.is_errored()) => AppState::Errored,
            None => AppState::Running,
        }
    }

    /// The command line's addresses, then those the app's workers asked for.
    fn listen_addresses(&self) -> Vec<String> {
        let mut listen: Vec<String> = self
            .plan
            .listeners
            .iter()
            .map(|l| l.addr.to_string())
            .collect();
        for id in self.servers.ids() {
            if let Some(s) = self.servers.get(id) {
                if !s.from_cli {
                    listen.push(s.display.clone());
                }
            }
        }
        listen
    }
}

/// How `herd status` shows a worker's lifecycle state.
pub(super) fn shown_state(w: &Worker) -> Shown {
    let state = w.state();
    if state.is_hung() {
        Shown::Hung
    } else if state.is_draining() {
        Shown::Stopping
    } else if state.unready_reason().is_some() {
        Shown::Unready
    } else if state.has_been_ready() {
        Shown::Ready
    } else {
        Shown::Starting
    }
}

/// A slot's current or incoming worker; takes a CPU reading.
fn worker_status(os: &dyn Os, w: &mut Worker, instance: usize, slot: &Slot) -> WorkerStatus {
    let now = os.cpu_ticks(w.pid).map(CpuSample::now);
    let cpu = match (&now, &w.cpu) {
        (Some(now), Some(before)) => now.percent_since(before),
        (Some(now), None) => now.percent_since(&CpuSample::at_start(w.started)),
        _ => 0.0,
    };
    if now.is_some() {
        w.cpu = now;
    }
    WorkerStatus {
        instance,
        worker_id: w.id,
        pid: w.pid,
        state: shown_state(w),
        uptime_ms: w.started.elapsed().as_millis() as u64,
        restarts: slot.restarts,
        last_exit: slot.last_exit.clone(),
        cpu_percent: cpu,
        memory_bytes: os.rss_bytes(w.pid).unwrap_or(0),
        connections: w.connections,
        status_text: w.status.clone(),
        health: w.health.clone(),
        restarts_by_reason: reasons(slot),
    }
}

/// A slot without a worker: given up, or waiting for its restart.
fn empty_slot_status(instance: usize, slot: &Slot) -> WorkerStatus {
    WorkerStatus {
        instance,
        worker_id: 0,
        pid: 0,
        state: if slot.state.is_errored() {
            Shown::Errored
        } else {
            Shown::Waiting
        },
        uptime_ms: 0,
        restarts: slot.restarts,
        last_exit: slot
            .state
            .errored()
            .map(str::to_string)
            .or_else(|| slot.last_exit.clone()),
        cpu_percent: 0.0,
        memory_bytes: 0,
        connections: 0,
        status_text: None,
        health: None,
        restarts_by_reason: reasons(slot),
    }
}

/// A worker no longer its slot's (replaced, or its slot removed), until it exits.
fn leaving_status(os: &dyn Os, w: &Worker) -> WorkerStatus {
    WorkerStatus {
        instance: w.instance,
        worker_id: w.id,
        pid: w.pid,
        state: Shown::Stopping,
        uptime_ms: w.started.elapsed().as_millis() as u64,
        restarts: 0,
        last_exit: None,
        cpu_percent: 0.0,
        memory_bytes: os.rss_bytes(w.pid).unwrap_or(0),
        connections: w.connections,
        status_text: w.status.clone(),
        health: w.health.clone(),
        restarts_by_reason: Default::default(),
    }
}

fn reasons(slot: &Slot) -> BTreeMap<Reason, u32> {
    slot.reasons.clone()
}
