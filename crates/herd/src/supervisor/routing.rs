//! Routing of the connections herd accepts to workers (round-robin, and for hash and sticky
//! the ones herd takes from a slot without a ready worker), the queue of connections waiting
//! for a free worker, and re-routing when a worker goes away.

use std::rc::Rc;

use herd_proto::event::EventName;

use super::*;
use crate::balance::{self, Pending};
use crate::spec::Balance;
use crate::vocab::ServerId;
use worker::Worker;

impl Supervisor {
    /// Takes a worker out of routing and out of every server; re-routes what it held.
    pub(super) fn detach(&mut self, w: &mut Worker) {
        w.channel = None;
        for server in std::mem::take(&mut w.servers) {
            if let Some(s) = self.servers.get_mut(server) {
                s.workers.retain(|&x| x != w.id);
            }
        }
        // The channel (and every queued message holding a connection's fd) is gone, so each
        // connection it had is ours alone again.
        for f in std::mem::take(&mut w.inflight) {
            let server = f.server;
            if f.probe {
                continue;
            }
            if let Some(mut conn) = f.into_pending() {
                conn.attempts = conn.attempts.saturating_add(1);
                self.route(server, conn);
            }
        }
    }

    /// Sends a connection to a worker, or queues it.
    pub(super) fn route(&mut self, server: ServerId, conn: Pending) {
        self.route_avoiding(server, conn, None)
    }

    pub(super) fn route_avoiding(
        &mut self,
        server: ServerId,
        conn: Pending,
        avoid: Option<WorkerId>,
    ) {
        let Some(s) = self.servers.get_mut(server) else {
            return;
        };
        let limit = s.workers.len().max(1) + 2;
        if usize::from(conn.attempts) > limit {
            // Refused everywhere: closing it (dropping the fd) is all that is left.
            if let Some(n) = s.refused.note() {
                let (total, display) = (s.refused.total, s.display.clone());
                self.logger.event(
                    EventName::ConnClosed,
                    None,
                    &format!(
                        "closed {n} connection(s) on {display} that every worker refused or failed to take; {total} so far"
                    ),
                    &[("closed", serde_json::json!(total))],
                );
            }
            return;
        }
        let sticky = match s.mode {
            Balance::Sticky => self
                .sticky_pick(server, conn.peer)
                .filter(|&id| Some(id) != avoid),
            _ => None,
        };
        let Some(s) = self.servers.get_mut(server) else {
            return;
        };
        let workers = &self.workers;
        let pick = sticky.or_else(|| {
            let mut free = |fallback: bool| {
                balance::next_free(&s.workers, &mut s.cursor, |id| {
                    Some(id) != avoid && workers.get(&id).is_some_and(|w| w.takes(server, fallback))
                })
            };
            free(false).or_else(|| only_unready_left(workers).then(|| free(true)).flatten())
        });
        let Some(id) = pick else {
            s.pending.push_back(conn);
            if s.pending.len() >= balance::MAX_QUEUED {
                if let Some(gate) = &s.gate {
                    gate.pause();
                }
            }
            return;
        };
        let key_json = Rc::clone(&s.key_json);
        let w = self.workers.get_mut(&id).expect("picked from workers");
        if let Err(conn) = w.hand_off(&self.tx, server, &key_json, conn) {
            // The channel just broke; the worker is on its way out. Try the others.
            if let Some(conn) = conn {
                self.route_avoiding(server, conn, Some(id));
            }
            return;
        }
        let health = &self.plan.spec.health;
        if let Some(max) = health.max_requests {
            let limit = max + crate::health::jitter(id, health.max_requests_jitter);
            if w.connections >= limit && w.replacement != state::Replacement::Queued {
                let why = format!("{} connections >= --max-requests {limit}", w.connections);
                self.queue_replacement(id, Reason::Requests, why);
            }
        }
    }

    /// Hands queued connections to workers that can take them.
    pub(super) fn drain(&mut self, server: ServerId) {
        loop {
            let Some(s) = self.servers.get_mut(server) else {
                return;
            };
            if s.pending.is_empty() {
                if let Some(gate) = &s.gate {
                    gate.resume();
                }
                return;
            }
            let before = s.pending.len();
            let workers = &self.workers;
            let any = |fallback: bool| {
                s.workers
                    .iter()
                    .any(|id| workers.get(id).is_some_and(|w| w.takes(server, fallback)))
            };
            if !(any(false) || only_unready_left(workers) && any(true)) {
                return;
            }
            let conn = s.pending.pop_front().expect("not empty");
            self.route(server, conn);
            let after = self.servers.get(server).map_or(0, |s| s.pending.len());
            if after >= before {
                return;
            }
        }
    }
}

/// No worker takes connections, but some said they are unready: connections go to those
/// rather than wait (a load balancer's "panic mode"). An unready worker is alive and
/// answers — a quick 503 of its own, say — where a held connection would hang until a
/// worker is ready again. Asked only once no ready worker was free.
fn only_unready_left(workers: &BTreeMap<WorkerId, Worker>) -> bool {
    !workers.values().any(|w| w.routable()) && workers.values().any(|w| w.routable_unready())
}
