//! `herd status`: the app and its workers as facts (`AppStatus`), with CPU and memory from
//! /proc. CPU is the average since the worker started for the first reading and since the
//! previous reading after that.

use herd_proto::control::{AppStatus, WorkerStatus};

use super::{Phase, Slot, Supervisor};
use crate::procfs::{self, CpuSample};
use crate::spec::WorkerKind;

impl Supervisor {
    pub(super) fn status(&mut self) -> AppStatus {
        let mut workers = Vec::new();
        for (instance, slot) in self.slots.iter().enumerate() {
            let ids = [slot.worker, slot.incoming];
            let mut any = false;
            for id in ids.into_iter().flatten() {
                let Some(w) = self.workers.get_mut(&id) else {
                    continue;
                };
                any = true;
                let now = CpuSample::take(w.pid);
                let cpu = match (&now, &w.cpu) {
                    (Some(now), Some(before)) => now.percent_since(before),
                    (Some(now), None) => now.percent_since(&CpuSample::at_start(w.started)),
                    _ => 0.0,
                };
                if now.is_some() {
                    w.cpu = now;
                }
                let state = if w.state().is_draining() {
                    "stopping"
                } else if w.state().has_been_ready() {
                    "ready"
                } else {
                    "starting"
                };
                workers.push(WorkerStatus {
                    instance,
                    worker_id: w.id,
                    pid: w.pid,
                    state: state.into(),
                    uptime_ms: w.started.elapsed().as_millis() as u64,
                    restarts: slot.restarts,
                    last_exit: slot.last_exit.clone(),
                    cpu_percent: cpu,
                    memory_bytes: procfs::rss_bytes(w.pid).unwrap_or(0),
                    connections: w.connections,
                    status_text: w.status.clone(),
                    health: w.health.clone(),
                    restarts_by_reason: reasons(slot),
                });
            }
            if !any {
                let state = if slot.errored.is_some() {
                    "errored"
                } else {
                    "waiting"
                };
                workers.push(WorkerStatus {
                    instance,
                    worker_id: 0,
                    pid: 0,
                    state: state.into(),
                    uptime_ms: 0,
                    restarts: slot.restarts,
                    last_exit: slot.errored.clone().or_else(|| slot.last_exit.clone()),
                    cpu_percent: 0.0,
                    memory_bytes: 0,
                    connections: 0,
                    status_text: None,
                    health: None,
                    restarts_by_reason: reasons(slot),
                });
            }
        }
        // Workers on their way out after a reload or scale-down.
        for w in self.workers.values() {
            let current = self
                .slots
                .get(w.instance)
                .is_some_and(|s| s.worker == Some(w.id) || s.incoming == Some(w.id));
            if !current {
                workers.push(WorkerStatus {
                    instance: w.instance,
                    worker_id: w.id,
                    pid: w.pid,
                    state: "stopping".into(),
                    uptime_ms: w.started.elapsed().as_millis() as u64,
                    restarts: 0,
                    last_exit: None,
                    cpu_percent: 0.0,
                    memory_bytes: procfs::rss_bytes(w.pid).unwrap_or(0),
                    connections: w.connections,
                    status_text: w.status.clone(),
                    health: w.health.clone(),
                    restarts_by_reason: Default::default(),
                });
            }
        }
        let ready = self.ready_slots();
        let state = match (&self.phase, &self.op) {
            (Phase::Stopping { .. }, _) => "stopping".to_string(),
            (Phase::Running, Some(op)) => format!("{}ing", op.kind.name().trim_end_matches('e')),
            (Phase::Running, None) if self.slots.iter().all(|s| s.errored.is_some()) => {
                "errored".into()
            }
            (Phase::Running, None) => "running".into(),
        };
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
        let me = std::process::id();
        AppStatus {
            name: self.plan.spec.name.clone(),
            state,
            balance: self.plan.balance.to_string(),
            kind: match self.plan.kind {
                WorkerKind::Node => "node".into(),
                WorkerKind::SocketActivation => "socket-activation".into(),
            },
            pid: me,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            desired: self.live_slots(),
            ready,
            restarts: self.slots.iter().map(|s| s.restarts).sum(),
            cpu_percent: (workers.iter().map(|w| w.cpu_percent).sum::<f64>() * 10.0).round() / 10.0,
            memory_bytes: workers.iter().map(|w| w.memory_bytes).sum(),
            supervisor_memory_bytes: procfs::rss_bytes(me).unwrap_or(0),
            listen,
            workers,
        }
    }
}

fn reasons(slot: &Slot) -> std::collections::BTreeMap<String, u32> {
    slot.reasons
        .iter()
        .map(|(k, v)| ((*k).to_string(), *v))
        .collect()
}
