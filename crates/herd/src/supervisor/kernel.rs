//! Kernel balancing (`--balance hash|sticky`): which slots the kernel may route new
//! connections to, and what happens to connections already queued in a slot that has no
//! ready worker.
//!
//! Every TCP address has a reuseport group with a socket per slot (`reuseport::Group`, in
//! the plan for `--listen`, in the Node server for a worker's `listen()`). After every event
//! the supervisor handles, [`Supervisor::reroute`] works out each group's *live set* — the
//! slots whose current worker is ready (Node: and holds that server) — and the group replaces
//! its BPF program when that set changed; the kernel then sends new connections to live slots
//! only. Slot sockets are never closed, so a slot keeps its queue and its index through its
//! worker's crash, hang, reload and restart, and scaling down only leaves a slot out.
//!
//! - `sticky`: a slot that loses its ready worker while it is still wanted (a crash, a hang)
//!   stays live for `--sticky-wait`: its clients' connections wait in its queue for the next
//!   worker instead of going to another one. Past the wait (or at once for a slot that is
//!   errored or scaled away) its buckets go to their next slots (`sticky_moved`).
//! - Node, hash and sticky: connections already queued in a slot that is not live (its worker
//!   died or hung, after the sticky wait) are taken by herd from that slot's socket and handed
//!   to ready workers, as round-robin does (sticky: to the worker of the slot the kernel now
//!   gives the client's address).
//! - Socket-activation workers cannot be handed connections: what is queued in a dead slot
//!   waits for that slot's next worker, which inherits the same socket. A slot that will not
//!   have one (scaled away, errored) has its queued connections closed by herd, so their
//!   clients fail fast instead of waiting forever.
//!
//! Workers hold these sockets too (and can clear their shared O_NONBLOCK flag), so herd
//! accepts from them only on a `balance::AcceptThread` per socket, never on the runtime
//! thread; the thread is kept, idle, while its slot is live.

use std::collections::BTreeSet;
use std::rc::Rc;

use herd_proto::event::EventName;
use serde_json::json;

use super::*;
use crate::balance::{self, AcceptGate};
use crate::spec::Balance;
use crate::vocab::ServerId;

impl Supervisor {
    /// Slots whose current worker is ready for connections; when there is none, those
    /// whose worker said it is unready (see `only_unready_left`: they answer, a dead or
    /// empty slot's queue would hang).
    fn slots_taking_connections(&self) -> BTreeSet<usize> {
        let slots_where = |pred: &dyn Fn(&Worker) -> bool| -> BTreeSet<usize> {
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, slot)| {
                    slot.worker
                        .and_then(|id| self.workers.get(&id))
                        .is_some_and(pred)
                })
                .map(|(i, _)| i)
                .collect()
        };
        let ready = slots_where(&|w| w.state().takes_connections());
        if ready.is_empty() {
            slots_where(&|w| w.state().unready_reason().is_some())
        } else {
            ready
        }
    }

    /// Whether a slot that just lost its ready worker keeps its clients for a while: sticky,
    /// the app running, and the slot still wanted (not errored, not scaled away) and not
    /// left by a worker that said it is unready (that one is alive and chose to leave: its
    /// clients move at once).
    fn holds(&self, instance: usize) -> bool {
        self.plan.balance == Balance::Sticky
            && !self.phase.is_stopping()
            && self.slots.get(instance).is_some_and(|s| {
                !s.retiring
                    && !s.state.is_errored()
                    && s.worker
                        .and_then(|id| self.workers.get(&id))
                        .is_none_or(|w| w.state().unready_reason().is_none())
            })
    }

    /// Recomputes every group's live set (see the module doc). Cheap when nothing changed.
    pub(super) fn reroute(&mut self) {
        if !self.plan.balance.per_slot() {
            return;
        }
        let now = tokio::time::Instant::now();
        let ready = self.slots_taking_connections();
        // Sticky holds: start one for each slot that lost its ready worker; end those whose
        // slot is ready again, no longer wanted, or past the wait.
        let lost: Vec<usize> = self.was_ready.difference(&ready).copied().collect();
        for instance in lost {
            if self.holds(instance) {
                let wait = self.plan.spec.policy.sticky_wait;
                self.held.insert(instance, now + wait);
                self.after(wait, Event::Reroute);
            }
        }
        let expired: Vec<usize> = self
            .held
            .iter()
            .filter(|&(&i, &until)| ready.contains(&i) || !self.holds(i) || until <= now)
            .map(|(&i, _)| i)
            .collect();
        let mut moved = Vec::new();
        for instance in expired {
            self.held.remove(&instance);
            if !ready.contains(&instance) {
                moved.push(instance);
            }
        }
        self.was_ready = ready.clone();
        let live: BTreeSet<usize> = ready
            .union(&self.held.keys().copied().collect())
            .copied()
            .collect();

        // `--listen` groups (socket activation, and Node servers that reuse them).
        let listener_groups: Vec<_> = self
            .plan
            .listeners
            .iter()
            .filter_map(|l| l.group.clone())
            .collect();
        for group in &listener_groups {
            let set: Vec<usize> = live.iter().copied().collect();
            self.route_group(group, &set);
        }
        if self.plan.kind == crate::spec::WorkerKind::SocketActivation {
            self.close_abandoned_slots(&live);
        }

        // Node servers: a slot is live for a server once its worker holds that server.
        for server in self.servers.ids().collect::<Vec<_>>() {
            let Some(s) = self.servers.get(server) else {
                continue;
            };
            let Some(group) = s.group.clone() else {
                continue;
            };
            let set: Vec<usize> = live
                .iter()
                .copied()
                .filter(|&i| {
                    self.held.contains_key(&i)
                        || self.slots[i].worker.is_some_and(|id| {
                            s.workers.contains(&id)
                                && self
                                    .workers
                                    .get(&id)
                                    .is_some_and(|w| w.routable() || w.routable_unready())
                        })
                })
                .collect();
            if !s.from_cli {
                self.route_group(&group, &set);
            }
            self.drain_dead_slots(server, &set);
        }
        // Said once the kernel routes the new way.
        for instance in moved {
            let wait = self.plan.spec.policy.sticky_wait;
            self.logger.event(
                EventName::StickyMoved,
                None,
                &format!(
                    "slot {instance} has had no ready worker for {}: its clients go to their next slots until it is back",
                    human(wait)
                ),
                &[("instance", json!(instance))],
            );
        }
    }

    /// Socket activation: connections queued in the socket of a slot that will not have a
    /// worker again (scaled away, errored) cannot be handed to another worker: herd closes
    /// them, so their clients fail fast instead of waiting forever. A slot that comes back
    /// (scaled up again, `herd restart`) stops this.
    fn close_abandoned_slots(&mut self, live: &BTreeSet<usize>) {
        let stopping = self.phase.is_stopping();
        for (index, l) in self.plan.listeners.iter().enumerate() {
            let Some(group) = &l.group else {
                continue;
            };
            for slot in 0..group.borrow().len() {
                let abandoned = !stopping
                    && !live.contains(&slot)
                    && self.slots.get(slot).is_none_or(|s| {
                        s.worker.is_none()
                            && s.incoming.is_none()
                            && (s.retiring || s.state.is_errored())
                    });
                let key = (index, slot);
                if let Some(thread) = self.closers.get(&key) {
                    thread.set_active(abandoned);
                    continue;
                }
                if !abandoned {
                    continue;
                }
                let Some(socket) = group.borrow().socket_rc(slot) else {
                    continue;
                };
                match balance::AcceptThread::spawn(&socket, balance::Take::Refuse, None) {
                    Ok(thread) => {
                        self.closers.insert(key, thread);
                    }
                    Err(e) => self.logger.event(
                        EventName::Error,
                        None,
                        &format!("cannot start a thread to refuse slot {slot}'s queue: {e}"),
                        &[],
                    ),
                }
            }
        }
    }

    fn route_group(&mut self, group: &crate::plan::SharedGroup, live: &[usize]) {
        let result = group.borrow_mut().route(live);
        if let Err(e) = result {
            self.logger
                .event(EventName::Error, None, &e.to_string(), &[]);
        }
    }

    /// Node: herd takes the connections queued in the sockets of slots that are not `live`
    /// and hands them to ready workers; it stops once the slot is live again.
    fn drain_dead_slots(&mut self, server: ServerId, live: &[usize]) {
        let tx = self.tx.clone();
        let Some(s) = self.servers.get_mut(server) else {
            return;
        };
        let Some(group) = s.group.clone() else {
            return;
        };
        let slots = group.borrow().len();
        let gate = Rc::clone(s.gate.get_or_insert_with(|| Rc::new(AcceptGate::default())));
        let mut failed = Vec::new();
        for slot in 0..slots {
            let wanted = !live.is_empty() && !live.contains(&slot);
            if let Some(thread) = s.drains.get(&slot) {
                thread.set_active(wanted);
                continue;
            }
            if !wanted {
                continue;
            }
            let Some(socket) = group.borrow().socket_rc(slot) else {
                continue;
            };
            let (hand, _) = s.drain_hand.get_or_insert_with(|| {
                let (hand, rx) = balance::hand_channel();
                let task = tokio::task::spawn_local(balance::forward_loop(
                    server,
                    rx,
                    Rc::clone(&gate),
                    tx.clone(),
                ));
                (hand, task)
            });
            match balance::AcceptThread::spawn(&socket, balance::Take::Hand, Some(hand.clone())) {
                Ok(thread) => {
                    s.drains.insert(slot, thread);
                }
                Err(e) => failed.push(format!(
                    "cannot start a thread to take slot {slot}'s queued connections: {e}"
                )),
            }
        }
        for why in failed {
            self.logger.event(EventName::Error, None, &why, &[]);
        }
    }

    /// The worker for a connection herd took from a slot's queue: sticky, the ready worker
    /// of the slot the kernel gives the client's address now.
    pub(super) fn sticky_pick(
        &self,
        server: ServerId,
        peer: Option<std::net::IpAddr>,
    ) -> Option<WorkerId> {
        let s = self.servers.get(server)?;
        let slot = s.group.as_ref()?.borrow().sticky_slot(peer?)?;
        let id = self.slots.get(slot)?.worker?;
        self.workers
            .get(&id)
            .filter(|w| w.routable() && s.workers.contains(&id))
            .map(|_| id)
    }
}

/// The per-slot sockets of a group that `instance` needs (scaling up adds them).
pub(super) fn slot_socket(
    group: &crate::plan::SharedGroup,
    instance: usize,
) -> std::io::Result<Rc<std::os::fd::OwnedFd>> {
    let mut g = group.borrow_mut();
    g.grow(instance + 1)?;
    g.socket_rc(instance)
        .ok_or_else(|| std::io::Error::other("no socket for the slot"))
}
