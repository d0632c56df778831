//! A worker's lifecycle as one state machine, and its role in its slot.
//!
//! ```text
//! Starting ──online (Node)──▶ Online
//! Starting, Online ──ready──▶ Ready
//! Starting, Online ──leaves on its own──▶ Leaving{ready: false} ──ready──▶ Leaving{ready: true}
//! Ready ──leaves on its own──▶ Leaving{ready: true}
//! Ready ──{herd: 'unready'}──▶ Unready ──{herd: 'ready'}──▶ Ready
//! Unready ──leaves on its own──▶ Leaving{ready: true}
//! Unready ──watchdog──▶ Hung
//! Ready, Leaving{ready: true} ──watchdog──▶ Hung
//! any of the above ──herd asks it to stop──▶ Draining
//! any ──reaped──▶ Exited
//! //! ```
//!
//! Every change goes through [`WorkerState::advance`], which refuses a transition the
//! picture does not have (a bug in herd: `debug_assert` in tests, logged in release). The
//! readers ask the state by name — [`WorkerState::takes_connections`],
//! [`WorkerState::counts_ready`], … — instead of combining flags.
//!
//! Not in this machine, because they run *beside* it rather than being stages of a life:
//! whether a health probe is in flight, whether a flush of the IPC socket is awaited, and
//! whether a graceful replacement is queued ([`Replacement`]). A worker is `Ready` while all
//! three come and go.

use tokio::time::Instant;

/// Its place in its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The worker that serves its slot (or served it, once replaced and draining).
    Current,
    /// Reload or replacement: started beside the current worker, no traffic until ready;
    /// becomes [`Role::Current`] when it is.
    Incoming,
}

/// What a worker was when herd asked it to stop: readiness counts for an operation's
/// bookkeeping until the worker exits, and a hung worker's exit is reported as `hung`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Before {
    NotReady,
    Ready,
    Hung,
}

/// Why herd asked a worker to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainReason {
    /// The app is stopping.
    Stop,
    /// Its successor is ready (reload, health replacement).
    Replaced,
    /// `herd restart`.
    Restart,
    /// Its slot is removed (`herd scale` down).
    ScaleDown,
    /// It was an incoming worker, and the reload or replacement failed.
    Abandoned,
}

impl DrainReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DrainReason::Stop => "stop",
            DrainReason::Replaced => "replaced",
            DrainReason::Restart => "restart",
            DrainReason::ScaleDown => "scale_down",
            DrainReason::Abandoned => "abandoned",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerState {
    /// Spawned, not ready yet (see `--ready`): no connections.
    Starting { since: Instant },
    /// Node: its cluster module said `online`; not ready yet.
    Online { since: Instant },
    /// Ready: takes connections, is health-checked, counts as a ready slot.
    Ready { since: Instant },
    /// It was ready and said it cannot serve for now (`process.send({herd: 'unready',
    /// reason})`): no new connections, not counted ready, not replaced for it; still
    /// health-checked. `{herd: 'ready'}` brings it back.
    Unready { since: Instant, reason: String },
    /// It announced it leaves on its own (`cluster.worker.disconnect()`, `STOPPING=1`): no
    /// new connections; its exit is unexpected and restarts the slot. `ready`: it had
    /// become ready (it still counts as a ready slot and is health-checked).
    Leaving { since: Instant, ready: bool },
    /// The watchdog found it hung: out of routing, being killed (SIGABRT, then SIGKILL).
    Hung { since: Instant },
    /// herd asked it to stop: out of routing, its exit is expected; SIGKILL at `deadline`.
    Draining {
        reason: DrainReason,
        deadline: Instant,
        before: Before,
    },
    /// Reaped: `status` in words (`code 1`, `signal 9, SIGKILL`).
    Exited { status: String },
}

/// A transition the state machine does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub from: &'static str,
    pub to: &'static str,
}

impl WorkerState {
    /// The state's name in logs (`"state"` events).
    pub fn name(&self) -> &'static str {
        match self {
            WorkerState::Starting { .. } => "starting",
            WorkerState::Online { .. } => "online",
            WorkerState::Ready { .. } => "ready",
            WorkerState::Unready { .. } => "unready",
            WorkerState::Leaving { .. } => "leaving",
            WorkerState::Hung { .. } => "hung",
            WorkerState::Draining { .. } => "draining",
            WorkerState::Exited { .. } => "exited",
        }
    }

    /// Moves to `next` if the machine has that transition.
    pub fn advance(&mut self, next: WorkerState) -> Result<(), Invalid> {
        if !self.can_become(&next) {
            return Err(Invalid {
                from: self.name(),
                to: next.name(),
            });
        }
        *self = next;
        Ok(())
    }

    fn can_become(&self, next: &WorkerState) -> bool {
        use WorkerState::*;
        match (self, next) {
            (Exited { .. }, _) => false,
            (_, Exited { .. }) => true,
            (Draining { .. }, _) => false,
            (_, Draining { before, .. }) => *before == self.before_drain(),
            (Starting { .. }, Online { .. }) => true,
            (Starting { .. } | Online { .. }, Ready { .. }) => true,
            (Starting { .. } | Online { .. }, Leaving { ready: false, .. }) => true,
            (
                Ready { .. } | Unready { .. } | Leaving { ready: false, .. },
                Leaving { ready: true, .. },
            ) => true,
            (Ready { .. } | Unready { .. } | Leaving { ready: true, .. }, Hung { .. }) => true,
            (Ready { .. }, Unready { .. }) | (Unready { .. }, Ready { .. }) => true,
            _ => false,
        }
    }

    fn before_drain(&self) -> Before {
        if self.is_hung() {
            Before::Hung
        } else if self.has_been_ready() {
            Before::Ready
        } else {
            Before::NotReady
        }
    }

    /// The state a readiness signal moves it to, if it is waiting for one.
    pub fn on_ready(&self, now: Instant) -> Option<WorkerState> {
        match self {
            WorkerState::Starting { .. } | WorkerState::Online { .. } => {
                Some(WorkerState::Ready { since: now })
            }
            WorkerState::Leaving {
                since,
                ready: false,
            } => Some(WorkerState::Leaving {
                since: *since,
                ready: true,
            }),
            _ => None,
        }
    }

    /// The state its announcement that it leaves moves it to (none once it is already
    /// leaving, hung or stopped by herd).
    pub fn on_leaving(&self, now: Instant) -> Option<WorkerState> {
        match self {
            WorkerState::Starting { .. } | WorkerState::Online { .. } => {
                Some(WorkerState::Leaving {
                    since: now,
                    ready: false,
                })
            }
            WorkerState::Ready { .. } | WorkerState::Unready { .. } => Some(WorkerState::Leaving {
                since: now,
                ready: true,
            }),
            _ => None,
        }
    }

    /// The state its own `{herd: 'unready'}` moves it to: only a ready worker leaves the
    /// rotation this way (one still starting is not in it; one already unready keeps its
    /// first reason).
    pub fn on_unready(&self, now: Instant, reason: String) -> Option<WorkerState> {
        match self {
            WorkerState::Ready { .. } => Some(WorkerState::Unready { since: now, reason }),
            _ => None,
        }
    }

    /// The state its own `{herd: 'ready'}` moves it to: back into the rotation, from
    /// `Unready` only (first readiness is `--ready`'s business).
    pub fn on_rejoin(&self, now: Instant) -> Option<WorkerState> {
        match self {
            WorkerState::Unready { .. } => Some(WorkerState::Ready { since: now }),
            _ => None,
        }
    }

    /// Out of the rotation at its own request: why.
    pub fn unready_reason(&self) -> Option<&str> {
        match self {
            WorkerState::Unready { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// The state herd's request to stop moves it to (none once it is draining).
    pub fn on_stop(&self, reason: DrainReason, deadline: Instant) -> Option<WorkerState> {
        match self {
            WorkerState::Draining { .. } | WorkerState::Exited { .. } => None,
            _ => Some(WorkerState::Draining {
                reason,
                deadline,
                before: self.before_drain(),
            }),
        }
    }

    /// Routable: round-robin and sticky may hand it a connection (given an open channel).
    pub fn takes_connections(&self) -> bool {
        matches!(self, WorkerState::Ready { .. })
    }

    /// Not ready yet, and still wanted: a readiness signal or `--listen-timeout` decides.
    pub fn awaiting_ready(&self) -> bool {
        matches!(
            self,
            WorkerState::Starting { .. }
                | WorkerState::Online { .. }
                | WorkerState::Leaving { ready: false, .. }
        )
    }

    /// Counts as a ready slot (`herd status`'s "N of M ready", systemd's READY=1): it
    /// became ready and herd has not asked it to stop.
    pub fn counts_ready(&self) -> bool {
        matches!(
            self,
            WorkerState::Ready { .. }
                | WorkerState::Leaving { ready: true, .. }
                | WorkerState::Hung { .. }
        )
    }

    /// Became ready at some point (also while unready or draining afterwards).
    pub fn has_been_ready(&self) -> bool {
        self.counts_ready()
            || matches!(self, WorkerState::Unready { .. })
            || matches!(
                self,
                WorkerState::Draining {
                    before: Before::Ready | Before::Hung,
                    ..
                }
            )
    }

    /// Watched by the health tick (watchdog, probes, limits).
    pub fn health_checked(&self) -> bool {
        matches!(
            self,
            WorkerState::Ready { .. }
                | WorkerState::Unready { .. }
                | WorkerState::Leaving { ready: true, .. }
        )
    }

    /// herd asked it to stop: its exit is expected.
    pub fn is_draining(&self) -> bool {
        matches!(self, WorkerState::Draining { .. })
    }

    /// Found hung (also while draining afterwards): its exit is reported as `hung`.
    pub fn is_hung(&self) -> bool {
        matches!(
            self,
            WorkerState::Hung { .. }
                | WorkerState::Draining {
                    before: Before::Hung,
                    ..
                }
        )
    }

    /// herd is ending it, by request or by force: a closed channel needs no more action.
    pub fn is_being_stopped(&self) -> bool {
        matches!(
            self,
            WorkerState::Hung { .. } | WorkerState::Draining { .. }
        )
    }
}

/// A graceful replacement for a health reason (memory, age, probes, requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replacement {
    /// None asked for.
    Idle,
    /// Queued or running.
    Queued,
    /// The last one failed: not tried again before this.
    NotBefore(Instant),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use WorkerState::*;

    fn now() -> Instant {
        Instant::now()
    }

    fn drain(s: &WorkerState) -> WorkerState {
        s.on_stop(DrainReason::Stop, now() + Duration::from_secs(5))
            .expect("stoppable")
    }

    #[test]
    fn a_node_worker_goes_starting_online_ready_draining_exited() {
        let mut s = Starting { since: now() };
        s.advance(Online { since: now() }).expect("online");
        s.advance(s.on_ready(now()).expect("waits")).expect("ready");
        assert!(s.takes_connections() && s.counts_ready() && s.health_checked());
        s.advance(drain(&s)).expect("draining");
        assert!(s.is_draining() && !s.takes_connections() && !s.counts_ready());
        assert!(s.has_been_ready() && !s.is_hung());
        s.advance(Exited {
            status: "code 0".into(),
        })
        .expect("exited");
    }

    #[test]
    fn a_hung_worker_stays_hung_while_drained() {
        let mut s = Ready { since: now() };
        s.advance(Hung { since: now() }).expect("hung");
        assert!(s.counts_ready() && !s.takes_connections() && !s.health_checked());
        s.advance(drain(&s)).expect("draining");
        assert!(s.is_hung() && s.is_draining() && s.is_being_stopped());
    }

    #[test]
    fn a_worker_leaving_on_its_own_may_still_become_ready() {
        let mut s = Starting { since: now() };
        s.advance(s.on_leaving(now()).expect("leaves"))
            .expect("leaving");
        assert!(s.awaiting_ready() && !s.counts_ready());
        s.advance(s.on_ready(now()).expect("waits")).expect("ready");
        assert!(s.counts_ready() && s.health_checked() && !s.takes_connections());
        assert_eq!(s.on_leaving(now()), None, "already leaving");
        s.advance(Hung { since: now() })
            .expect("the watchdog still watches it");
    }

    #[test]
    fn a_ready_worker_leaves_and_rejoins_the_rotation_on_its_own_word() {
        let mut s = Ready { since: now() };
        s.advance(s.on_unready(now(), "db down".into()).expect("ready"))
            .expect("unready");
        assert_eq!(s.unready_reason(), Some("db down"));
        assert!(!s.takes_connections() && !s.counts_ready() && !s.awaiting_ready());
        assert!(s.health_checked() && s.has_been_ready());
        assert_eq!(
            s.on_unready(now(), "again".into()),
            None,
            "keeps its reason"
        );
        assert_eq!(
            s.on_ready(now()),
            None,
            "a listening event does not bring it back"
        );
        s.advance(s.on_rejoin(now()).expect("unready"))
            .expect("ready");
        assert!(s.takes_connections() && s.counts_ready());
        assert_eq!(s.on_rejoin(now()), None, "already in the rotation");
    }

    #[test]
    fn an_unready_worker_is_still_watched_and_drained_as_ready() {
        let unready = || Unready {
            since: now(),
            reason: "busy".into(),
        };
        let mut hung = unready();
        hung.advance(Hung { since: now() })
            .expect("the watchdog still applies");
        let mut leaving = unready();
        leaving
            .advance(leaving.on_leaving(now()).expect("leaves"))
            .expect("leaving");
        assert!(leaving.counts_ready());
        let drained = drain(&unready());
        assert!(drained.has_been_ready() && !drained.is_hung());
        for from in [Starting { since: now() }, Online { since: now() }] {
            assert_eq!(
                from.on_unready(now(), "x".into()),
                None,
                "not in the rotation yet"
            );
            assert!(from.clone().advance(unready()).is_err());
        }
    }

    #[test]
    fn invalid_transitions_are_refused_and_change_nothing() {
        let refused = [
            (Starting { since: now() }, Hung { since: now() }),
            (Ready { since: now() }, Starting { since: now() }),
            (Ready { since: now() }, Online { since: now() }),
            (Hung { since: now() }, Ready { since: now() }),
            (
                Exited {
                    status: "code 0".into(),
                },
                Ready { since: now() },
            ),
        ];
        for (from, to) in refused {
            let mut s = from.clone();
            let err = s.advance(to.clone()).expect_err("invalid");
            assert_eq!((err.from, err.to), (from.name(), to.name()));
            assert_eq!(s, from);
        }
        let mut draining = drain(&Ready { since: now() });
        let before = draining.clone();
        assert!(draining.advance(Ready { since: now() }).is_err());
        assert!(draining.advance(Hung { since: now() }).is_err());
        assert_eq!(draining, before);
        assert_eq!(draining.on_stop(DrainReason::Stop, now()), None);
        assert_eq!(draining.on_ready(now()), None);
    }

    #[test]
    fn a_drain_must_remember_what_the_worker_was() {
        let mut s = Ready { since: now() };
        let lying = Draining {
            reason: DrainReason::Stop,
            deadline: now(),
            before: Before::NotReady,
        };
        assert!(s.advance(lying).is_err());
    }

    #[test]
    fn exit_is_possible_from_every_live_state() {
        let live = [
            Starting { since: now() },
            Online { since: now() },
            Ready { since: now() },
            Leaving {
                since: now(),
                ready: false,
            },
            Hung { since: now() },
            drain(&Starting { since: now() }),
        ];
        for mut s in live {
            s.advance(Exited {
                status: "signal 9, SIGKILL".into(),
            })
            .expect("exit");
        }
    }
}
