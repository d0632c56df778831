//! Operations on a running app that take time and have an outcome: rolling reload, restart
//! and scale. At most one runs at a time; a second is refused, not queued.
//!
//! **Reload**: for each slot, `parallel` at a time, an *incoming* worker starts beside the
//! current one and gets no traffic until it is ready. Once ready it becomes the slot's
//! current worker, and the old one is taken out of routing and stopped gracefully. If an
//! incoming worker exits or is not ready within `--listen-timeout`, it is stopped, the
//! reload ends there, and every slot not yet replaced keeps its old worker: a bad release
//! never replaces a good one. The answer comes when every old worker has exited.
//!
//! **Restart**: every worker is stopped and its slot started again once it is gone.
//!
//! **Restart one worker** (`herd restart NAME --instance N`): one step of a reload for one
//! slot, with the same guarantee: the old worker stops only once its successor is ready.
//!
//! **Scale**: new slots start workers; removed slots (the highest instances) stop theirs
//! gracefully and disappear once they exited.

use std::collections::VecDeque;

use herd_proto::control::{AppState, Reason, Response};
use herd_proto::event::EventName;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::slot::SlotState;
use super::state::{DrainReason, Replacement, Role};
use super::{Slot, Supervisor, WorkerId};
use crate::fmt::human;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Reload {
        parallel: usize,
    },
    Restart,
    Scale {
        to: usize,
    },
    /// One worker replaced for a health reason (`memory`, `unhealthy`, …).
    Replace {
        instance: usize,
        reason: Reason,
    },
    /// One worker replaced because the operator asked (`herd restart --instance`).
    RestartWorker {
        instance: usize,
    },
}

impl OpKind {
    pub fn name(self) -> &'static str {
        self.done_event().as_str()
    }

    /// The event logged when it ends well.
    pub fn done_event(self) -> EventName {
        match self {
            OpKind::Reload { .. } => EventName::Reload,
            OpKind::Restart | OpKind::RestartWorker { .. } => EventName::Restart,
            OpKind::Scale { .. } => EventName::Scale,
            OpKind::Replace { .. } => EventName::Replace,
        }
    }

    /// The app's state while it runs.
    pub fn state(self) -> AppState {
        match self {
            OpKind::Reload { .. } => AppState::Reloading,
            OpKind::Restart => AppState::Restarting,
            OpKind::Scale { .. } => AppState::Scaling,
            OpKind::Replace { .. } | OpKind::RestartWorker { .. } => AppState::Replacing,
        }
    }

    pub fn state_name(self) -> &'static str {
        self.state().as_str()
    }
}

/// The least time before a failed health replacement is tried again.
const REPLACE_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Op {
    pub kind: OpKind,
    reply: Option<oneshot::Sender<Response>>,
    /// Slots still to reload.
    todo: VecDeque<usize>,
    /// Slots with an incoming worker.
    active: Vec<usize>,
    /// Replaced workers not yet exited.
    retired: Vec<WorkerId>,
    started: Instant,
    replaced: usize,
}

impl Op {
    pub fn new(kind: OpKind, reply: Option<oneshot::Sender<Response>>) -> Self {
        Op {
            kind,
            reply,
            todo: VecDeque::new(),
            active: Vec::new(),
            retired: Vec::new(),
            started: Instant::now(),
            replaced: 0,
        }
    }
}

/// Parses `N`, `+K`, `-K` against the current count.
pub fn scale_target(to: &str, current: usize) -> Result<usize, String> {
    let bad = || format!("`{to}` is not a worker count: use N, +K or -K (e.g. 8, +2, -1)");
    let target = if let Some(k) = to.strip_prefix('+') {
        current
            .checked_add(k.parse().map_err(|_| bad())?)
            .ok_or_else(bad)?
    } else if let Some(k) = to.strip_prefix('-') {
        let k: usize = k.parse().map_err(|_| bad())?;
        current
            .checked_sub(k)
            .ok_or_else(|| format!("cannot remove {k} of {current} workers"))?
    } else {
        to.parse().map_err(|_| bad())?
    };
    if target == 0 {
        return Err("an app needs at least 1 worker; use `herd stop` to stop it".into());
    }
    crate::spec::check_worker_count(target)
}

fn refuse(reply: Option<oneshot::Sender<Response>>, message: String) {
    if let Some(reply) = reply {
        let _ = reply.send(Response::error(message));
    }
}

impl Supervisor {
    /// Starts an operation, or refuses it with a reason.
    pub(super) fn begin(&mut self, kind: OpKind, reply: Option<oneshot::Sender<Response>>) {
        if self.winding_down() {
            return refuse(reply, "the app is stopping".into());
        }
        let reply = match self.take_over_replacement(kind, reply) {
            Ok(()) => return,
            Err(reply) => reply,
        };
        if let Some(op) = self.phase.op() {
            let message = format!(
                "a {} is already in progress (started {} ago); wait for it to finish",
                op.kind.name(),
                human(op.started.elapsed())
            );
            self.logger.event(
                EventName::Refused,
                None,
                &format!("{} refused: {message}", kind.name()),
                &[],
            );
            return refuse(reply, message);
        }
        let live = self.live_slots();
        let mut op = Op::new(kind, reply);
        match kind {
            OpKind::Reload { .. } => {
                op.todo = (0..live).collect();
                self.tell_manager("RELOADING=1");
                self.logger.event(
                    EventName::Reloading,
                    None,
                    &format!("reloading {live} workers"),
                    &[],
                );
                self.change_phase(|p| p.begin(op));
                self.step_reload();
            }
            OpKind::Replace { instance, .. } => {
                op.todo = [instance].into();
                self.change_phase(|p| p.begin(op));
                self.step_reload();
            }
            OpKind::RestartWorker { instance } => {
                let who = self.slots[..live].get(instance).and_then(|s| s.worker);
                let message = match who {
                    Some(id) => format!(
                        "restarting {}[{instance}] (worker {id})",
                        self.plan.spec.name
                    ),
                    None => return refuse(op.reply, self.no_worker(instance)),
                };
                self.logger
                    .event(EventName::Restarting, None, &message, &[]);
                op.todo = [instance].into();
                self.change_phase(|p| p.begin(op));
                self.step_reload();
            }
            OpKind::Restart => {
                self.logger.event(
                    EventName::Restarting,
                    None,
                    &format!("restarting {live} workers"),
                    &[],
                );
                self.change_phase(|p| p.begin(op));
                self.restart_slots(live);
            }
            OpKind::Scale { to } => {
                self.logger.event(
                    EventName::Scaling,
                    None,
                    &format!("scaling from {live} to {to} workers"),
                    &[],
                );
                self.change_phase(|p| p.begin(op));
                self.scale_slots(live, to);
            }
        }
        self.check_op();
    }

    /// A reload asked for while a health replacement runs takes it over: the reload
    /// replaces that worker too. Gives the reply back when there is nothing to take over.
    fn take_over_replacement(
        &mut self,
        kind: OpKind,
        reply: Option<oneshot::Sender<Response>>,
    ) -> Result<(), Option<oneshot::Sender<Response>>> {
        let replacing = self
            .phase
            .op()
            .is_some_and(|op| matches!(op.kind, OpKind::Replace { .. }));
        if !replacing || !matches!(kind, OpKind::Reload { .. }) {
            return Err(reply);
        }
        let live = self.live_slots();
        let taken = self.change_phase(|p| {
            let op = p.take_over(kind)?;
            let busy: Vec<usize> = op.active.clone();
            op.reply = reply;
            op.todo = (0..live).filter(|i| !busy.contains(i)).collect();
            Ok(())
        });
        if taken.is_none() {
            return Ok(());
        }
        self.replacements.clear();
        self.logger.event(
            EventName::Reloading,
            None,
            "reloading every worker (takes over a replacement in progress)",
            &[],
        );
        self.step_reload();
        self.check_op();
        Ok(())
    }

    /// Restart: every slot's worker stops and starts again (errored slots too).
    fn restart_slots(&mut self, live: usize) {
        for instance in 0..live {
            if self.slots[instance].state.is_errored() {
                self.set_slot_state(instance, SlotState::Active);
            }
            let slot = &mut self.slots[instance];
            slot.backoff = super::restart::Backoff::new(&self.plan.spec.policy);
            match slot.worker {
                Some(id) => {
                    self.set_slot_state(instance, SlotState::Respawning);
                    self.stop_worker(id, DrainReason::Restart);
                }
                // Waiting out a backoff: its timer starts the worker.
                None if slot.state.is_restart_due() => {}
                None => {
                    self.start_worker(instance, false);
                }
            }
        }
    }

    /// Scale: new slots start workers; removed ones (the highest) stop theirs.
    fn scale_slots(&mut self, live: usize, to: usize) {
        if to > live {
            for instance in live..to {
                if instance < self.slots.len() {
                    self.slots[instance].retiring = false;
                } else {
                    self.slots.push(Slot::new(&self.plan.spec.policy));
                }
                if self.slots[instance].worker.is_none() {
                    self.slot_filled(instance);
                    self.start_worker(instance, false);
                }
            }
        } else {
            for instance in to..live {
                self.slots[instance].retiring = true;
                if let Some(id) = self.slots[instance].worker {
                    self.stop_worker(id, DrainReason::ScaleDown);
                }
                if let Some(id) = self.slots[instance].incoming {
                    self.stop_worker(id, DrainReason::ScaleDown);
                }
            }
            // Slots with no worker (errored, waiting out a backoff) have nothing to wait for;
            // the rest go as their workers exit.
            self.trim_slots();
        }
        self.all_ready = false;
    }

    /// Slots that are not being removed.
    pub(super) fn live_slots(&self) -> usize {
        self.slots.iter().take_while(|s| !s.retiring).count()
    }

    fn step_reload(&mut self) {
        loop {
            let Some(op) = self.phase.op_mut() else {
                return;
            };
            let parallel = match op.kind {
                OpKind::Reload { parallel } => parallel,
                OpKind::Replace { .. } | OpKind::RestartWorker { .. } => 1,
                OpKind::Restart | OpKind::Scale { .. } => return,
            };
            if op.active.len() >= parallel.max(1) {
                return;
            }
            let Some(instance) = op.todo.pop_front() else {
                return;
            };
            op.active.push(instance);
            if self.start_worker(instance, true).is_none() {
                self.fail_op(format!(
                    "{}[{instance}] could not be started",
                    self.plan.spec.name
                ));
                return;
            }
        }
    }

    /// An incoming worker became ready: it takes over its slot.
    pub(super) fn promote(&mut self, id: WorkerId, instance: usize) {
        self.slot_filled(instance);
        let slot = &mut self.slots[instance];
        slot.incoming = None;
        let old = slot.worker.replace(id);
        if let Some(w) = self.workers.get_mut(&id) {
            w.role = Role::Current;
        }
        if let Some(op) = self.phase.op_mut() {
            let reason = match op.kind {
                OpKind::Replace { reason, .. } => reason,
                _ => Reason::Reload,
            };
            *slot.reasons.entry(reason).or_default() += 1;
            slot.restarts += 1;
            op.active.retain(|&i| i != instance);
            op.replaced += 1;
            if let Some(old) = old {
                op.retired.push(old);
            }
        }
        if let Some(old) = old {
            self.stop_worker(old, DrainReason::Replaced);
        }
        self.step_reload();
    }

    /// An incoming worker failed: the reload stops and the old workers stay.
    pub(super) fn incoming_failed(&mut self, id: WorkerId, instance: usize, why: String) {
        if let Some(slot) = self.slots.get_mut(instance) {
            if slot.incoming == Some(id) {
                slot.incoming = None;
            }
        }
        if self.workers.contains_key(&id) {
            self.stop_worker(id, DrainReason::Abandoned);
        }
        self.fail_op(format!(
            "{}[{instance}] (worker {id}) failed to become ready: {why}",
            self.plan.spec.name
        ));
    }

    fn fail_op(&mut self, message: String) {
        let Some(mut op) = self.finish_op() else {
            return;
        };
        self.settle_reconfigure(false);
        for instance in std::mem::take(&mut op.active) {
            if let Some(id) = self.slots.get_mut(instance).and_then(|s| s.incoming.take()) {
                self.stop_worker(id, DrainReason::Abandoned);
            }
        }
        // What each slot runs now: a worker started since the operation began runs the new
        // version (an incoming worker that was promoted, or a crash restart during it), an
        // older one the previous version. Slots without a worker count for neither.
        let (mut new_version, mut previous) = (0, 0);
        for id in self.slots[..self.live_slots()]
            .iter()
            .filter_map(|s| s.worker)
        {
            match self.workers.get(&id) {
                Some(w) if w.started >= op.started => new_version += 1,
                Some(_) => previous += 1,
                None => {}
            }
        }
        // Workers that were due for a health replacement stay due: their checks resume, and
        // the replacement is tried again after a pause rather than in a tight loop.
        let retry = Instant::now() + REPLACE_RETRY.max(self.plan.spec.policy.listen_timeout);
        for w in self
            .workers
            .values_mut()
            .filter(|w| w.replacement == Replacement::Queued && !w.state().is_draining())
        {
            w.replacement = Replacement::NotBefore(retry);
        }
        let message = match op.kind {
            OpKind::Replace { instance, reason } => format!(
                "replacing {}[{instance}] ({reason}) failed: {message}. The current worker keeps running; herd tries again in {}.",
                self.plan.spec.name,
                human(REPLACE_RETRY.max(self.plan.spec.policy.listen_timeout))
            ),
            OpKind::RestartWorker { instance } => format!(
                "restarting {}[{instance}] failed: {message}. The current worker keeps running.",
                self.plan.spec.name
            ),
            _ => format!(
                "{} failed after replacing {} of {} workers: {message}. {}, {}.",
                op.kind.name(),
                op.replaced,
                self.live_slots(),
                match new_version {
                    1 => "1 worker runs the new version".to_string(),
                    n => format!("{n} workers run the new version"),
                },
                match previous {
                    1 => "1 worker keeps running the previous version".to_string(),
                    n => format!("{n} workers keep running the previous version"),
                }
            ),
        };
        self.logger.event(EventName::OpFailed, None, &message, &[]);
        if matches!(op.kind, OpKind::Reload { .. }) {
            self.count_reload(false);
            self.tell_manager("READY=1");
        }
        if let Some(reply) = op.reply.take() {
            let _ = reply.send(Response::error(message));
        }
        self.next_replacement();
    }

    /// Finishes the current operation if its goal is reached.
    pub(super) fn check_op(&mut self) {
        let Some(op) = self.phase.op() else { return };
        let workers = &self.workers;
        // Ready, or given up on (not ready by --listen-timeout: the answer says so).
        let ready = |s: &Slot| {
            s.worker
                .and_then(|id| workers.get(&id))
                .is_some_and(|w| w.state().has_been_ready() || w.late)
        };
        let done = match op.kind {
            OpKind::Reload { .. } | OpKind::Replace { .. } | OpKind::RestartWorker { .. } => {
                op.todo.is_empty()
                    && op.active.is_empty()
                    && op.retired.iter().all(|id| !workers.contains_key(id))
            }
            OpKind::Restart => self
                .slots
                .iter()
                .all(|s| !s.state.is_respawning() && (s.state.is_errored() || ready(s))),
            OpKind::Scale { to } => {
                self.slots.len() == to
                    && self.slots.iter().all(|s| s.state.is_errored() || ready(s))
            }
        };
        if !done {
            return;
        }
        let Some(mut op) = self.finish_op() else {
            return;
        };
        self.settle_reconfigure(true);
        let errored = self.slots.iter().filter(|s| s.state.is_errored()).count();
        let late = self
            .slots
            .iter()
            .filter_map(|s| s.worker.and_then(|id| self.workers.get(&id)))
            .filter(|w| w.late && !w.state().has_been_ready())
            .count();
        let took = human(op.started.elapsed());
        let (ok, message) = match op.kind {
            OpKind::Reload { .. } => (true, format!("reloaded {} workers in {took}", op.replaced)),
            OpKind::Restart => (
                errored == 0 && late == 0,
                format!("restarted {} workers in {took}", self.slots.len() - errored),
            ),
            OpKind::Scale { to } => (
                errored == 0 && late == 0,
                format!("scaled to {to} workers in {took}"),
            ),
            OpKind::Replace { instance, reason } => (
                true,
                format!(
                    "replaced {}[{instance}] ({reason}) in {took}",
                    self.plan.spec.name
                ),
            ),
            OpKind::RestartWorker { instance } => (
                true,
                format!(
                    "restarted {}[{instance}] in {took}: pid {}",
                    self.plan.spec.name,
                    self.slot_pid(instance)
                        .map_or_else(|| "-".to_string(), |p| p.to_string())
                ),
            ),
        };
        let message = if errored > 0 {
            format!("{message}; {errored} slots errored (see herd logs)")
        } else {
            message
        };
        let message = if late > 0 {
            format!("{message}; {late} workers not ready within --listen-timeout (see herd logs: ready_timeout)")
        } else {
            message
        };
        self.logger.event(op.kind.done_event(), None, &message, &[]);
        if matches!(op.kind, OpKind::Reload { .. }) {
            self.count_reload(ok);
            self.tell_manager("READY=1");
        }
        if let Some(reply) = op.reply.take() {
            let _ = reply.send(if ok {
                Response::ok(message)
            } else {
                Response::error(message)
            });
        }
        self.next_replacement();
    }

    /// Why one slot's worker cannot be restarted: no such slot, or it has no worker now.
    fn no_worker(&self, instance: usize) -> String {
        let name = &self.plan.spec.name;
        let live = self.live_slots();
        match self.slots.get(instance) {
            Some(_) if instance < live => format!(
                "{name}[{instance}] has no running worker (errored or waiting to restart); \
                 `herd restart {name}` restarts every slot"
            ),
            _ => format!(
                "{name} has no instance {instance}: its instances are 0 to {} (see herd status {name})",
                live.saturating_sub(1)
            ),
        }
    }

    fn slot_pid(&self, instance: usize) -> Option<u32> {
        let id = self.slots.get(instance)?.worker?;
        self.workers.get(&id).map(|w| w.pid)
    }

    /// Removes retired slots at the end once their workers are gone.
    pub(super) fn trim_slots(&mut self) {
        while self
            .slots
            .last()
            .is_some_and(|s| s.retiring && s.worker.is_none() && s.incoming.is_none())
        {
            self.slots.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_targets() {
        assert_eq!(scale_target("8", 4), Ok(8));
        assert_eq!(scale_target("+2", 4), Ok(6));
        assert_eq!(scale_target("-1", 4), Ok(3));
        assert!(scale_target("-4", 4).unwrap_err().contains("at least 1"));
        assert!(scale_target("-5", 4).unwrap_err().contains("cannot remove"));
        assert!(scale_target("many", 4)
            .unwrap_err()
            .contains("not a worker count"));
        assert!(scale_target("0", 4).is_err());
    }
}
