//! A worker's life in its slot: start, readiness, stop, exit, and the restart decision.

use std::io;
use std::process::ExitStatus;
use std::time::Duration;

use herd_proto::event::EventName;
use herd_proto::node::ClusterMessage;
use herd_proto::notify::Message as Notify;
use serde_json::{json, Value};

use super::state::{DrainReason, Role, WorkerState};
use super::*;
use crate::fmt::describe_status;

/// Unstable restarts in a row after which a slot gives up while no worker of the app has
/// been ready since herd started (three runs in all), whatever `--max-restarts` says.
pub const STARTUP_MAX_RESTARTS: u32 = 2;
use crate::logs::Who;
use crate::spec::Ready;
use restart::Verdict;

impl Supervisor {
    /// Starts a worker in `instance`: its current worker, or (reload) its incoming one.
    pub(super) fn start_worker(&mut self, instance: usize, incoming: bool) -> Option<WorkerId> {
        let id = self.next_id;
        self.next_id += 1;
        match self.launcher.launch(id, instance) {
            Ok(mut worker) => {
                let who = worker.who();
                if incoming {
                    worker.role = Role::Incoming;
                }
                let what = if incoming { "replacement " } else { "" };
                self.logger.event(
                    EventName::Spawned,
                    Some(who),
                    &format!("started {what}(worker {id})"),
                    &[],
                );
                if incoming {
                    self.slots[instance].incoming = Some(id);
                } else {
                    self.slots[instance].worker = Some(id);
                }
                self.workers.insert(id, worker);
                let policy = &self.plan.spec.policy;
                if let Ready::Delay(delay) = self.plan.ready {
                    self.after(delay, Event::ReadyDue { id });
                }
                self.after(policy.listen_timeout, Event::ReadyTimeout { id });
                Some(id)
            }
            Err(e) => {
                let who = Who {
                    instance,
                    worker_id: id,
                    pid: 0,
                };
                let as_user = match &self.plan.user {
                    Some(u) => format!(" as user {}", u.name),
                    None => String::new(),
                };
                let reason = format!(
                    "could not start {}{as_user}: {e}",
                    self.plan.program.display()
                );
                self.logger
                    .event(EventName::SpawnFailed, Some(who), &reason, &[]);
                // Retrying cannot fix a program that is missing or not executable for us.
                let hopeless = matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
                ) || e.raw_os_error() == Some(libc::ENOEXEC);
                if hopeless && !incoming {
                    self.logger.event(
                        EventName::Errored,
                        Some(who),
                        &format!("errored: {reason}"),
                        &[("reason", json!(reason))],
                    );
                    self.set_slot_state(instance, SlotState::Errored { why: reason });
                    self.check_all_errored();
                } else if !incoming {
                    self.after_exit(instance, who, Duration::ZERO, &reason, reason.clone(), &[]);
                }
                None
            }
        }
    }

    /// Asks a worker to stop (out of routing first), all within `--kill-timeout`: a Node
    /// worker gets the user message `{"herd":"stopping","reason":…}`, then `disconnect`, and
    /// SIGTERM once its disconnect finished (its IPC channel closed: servers closed,
    /// requests answered) or at half the timeout, whichever comes first, if it is still
    /// there; any other worker (or a Node worker herd cannot write to) SIGTERM at once.
    /// SIGKILL when the timeout is up.
    pub(super) fn stop_worker(&mut self, id: WorkerId, reason: DrainReason) {
        let kill_timeout = self.plan.spec.policy.kill_timeout;
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let deadline = tokio::time::Instant::now() + kill_timeout;
        let Some(draining) = w.state().on_stop(reason, deadline) else {
            return;
        };
        w.set_state(draining);
        // Before `disconnect`, so that an app with long-lived connections (websockets) can
        // close them itself (1001, going away) instead of waiting for SIGTERM. A user
        // message: droppable like any other when the worker's queue is full.
        let stopping = json!({"herd": "stopping", "reason": reason.as_str()});
        if let Ok(line) = crate::node::channel::user_line(&stopping) {
            w.send(&self.tx, |c| c.user(line));
        }
        let asked = w.send(&self.tx, |c| c.cluster(&ClusterMessage::DISCONNECT));
        if asked {
            // Half the time for a graceful disconnect (servers closed, requests finished),
            // then SIGTERM for an app that stops on it; an app without a SIGTERM handler dies
            // of it, which is why it is not sent at once.
            let half = kill_timeout / 2;
            self.after(
                half,
                Event::KillDue {
                    id,
                    signal: rustix::process::Signal::TERM,
                    after: format!("disconnect and {}", human(half)),
                },
            );
        } else {
            w.termed = true;
            self.os
                .signal_group(&w.leader, rustix::process::Signal::TERM);
        }
        self.after(
            kill_timeout,
            Event::KillDue {
                id,
                signal: rustix::process::Signal::KILL,
                after: format!("--kill-timeout {}", human(kill_timeout)),
            },
        );
    }

    /// A timer to escalate fired. The worker may have exited meanwhile: once herd has reaped
    /// it (its record is gone, or its [`crate::spawn::Leader`] says reaped) nothing is sent.
    pub(super) fn kill_due(&mut self, id: WorkerId, signal: rustix::process::Signal, after: &str) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if signal == rustix::process::Signal::TERM && w.state().is_draining() {
            if w.termed {
                return;
            }
            w.termed = true;
        }
        let who = w.who();
        let sig = if signal == rustix::process::Signal::TERM {
            "SIGTERM"
        } else {
            "SIGKILL"
        };
        if !self.os.signal_group(&w.leader, signal) {
            return;
        }
        self.logger.event(
            EventName::Kill,
            Some(who),
            &format!("still running after {after} — sending {sig}"),
            &[],
        );
        // A worker herd stopped has its SIGKILL due at its deadline already (`stop_worker`);
        // one whose IPC channel closed by itself gets a short grace.
        if signal == rustix::process::Signal::TERM && !w.state().is_draining() {
            self.after(
                TERM_GRACE,
                Event::KillDue {
                    id,
                    signal: rustix::process::Signal::KILL,
                    after: format!("SIGTERM and {}", human(TERM_GRACE)),
                },
            );
        }
    }

    /// A worker was reaped: its slot learns why, and restarts it, gives up, or (asked to
    /// stop) moves on.
    pub(super) fn on_exit(&mut self, id: WorkerId, status: io::Result<ExitStatus>) {
        let Some(mut w) = self.workers.remove(&id) else {
            return;
        };
        // Whatever the worker left in its process group went with it, just before it was
        // reaped (spawn::wait_exit): after the reap the group's number is not ours to signal.
        let who = w.who();
        let uptime = w.started.elapsed();
        let expected = w.state().is_draining();
        let hung = w.state().is_hung();
        let incoming = w.role == Role::Incoming;
        let how = match &status {
            Ok(s) => describe_status(s),
            Err(e) => format!("lost ({e})"),
        };
        let fields = exit_fields(&status, uptime, expected, hung);
        w.set_state(WorkerState::Exited {
            status: how.clone(),
        });
        self.detach(&mut w);
        let instance = w.instance;
        let reason = with_last_output(&how, &w);
        let Some(slot) = self.slots.get_mut(instance) else {
            self.logger.event(
                EventName::Exited,
                Some(who),
                &format!("stopped: {how} after {}", human(uptime)),
                &fields,
            );
            return;
        };
        if slot.worker == Some(id) {
            slot.worker = None;
            slot.last_exit = Some(if expected {
                how.clone()
            } else {
                reason.clone()
            });
            self.all_ready = false;
        }
        if incoming && !expected {
            self.logger.event(
                EventName::Exited,
                Some(who),
                &format!(
                    "replacement exited ({how}) after {} before it was ready",
                    human(uptime)
                ),
                &fields,
            );
            self.incoming_failed(id, instance, format!("exited ({reason})"));
            return;
        }
        if expected || self.phase.is_stopping() || slot.retiring {
            self.logger.event(
                EventName::Exited,
                Some(who),
                &format!("stopped: {how} after {}", human(uptime)),
                &fields,
            );
            self.after_stopped_exit(instance);
            return;
        }
        let cause = if hung { Reason::Hung } else { Reason::Crash };
        *slot.reasons.entry(cause).or_default() += 1;
        self.after_exit(instance, who, uptime, &how, reason, &fields);
        self.check_op();
    }

    /// A worker herd stopped (or whose slot is going) is gone: a restart starts its
    /// successor, a scale-down drops the slot, an operation may be done.
    fn after_stopped_exit(&mut self, instance: usize) {
        let running = !self.phase.is_stopping();
        let slot = &self.slots[instance];
        if slot.state.is_respawning() && slot.worker.is_none() && running {
            self.set_slot_state(instance, SlotState::Active);
            self.start_worker(instance, false);
        }
        self.trim_slots();
        self.check_op();
    }

    /// Decides whether a slot whose worker just died restarts or gives up.
    pub(super) fn after_exit(
        &mut self,
        instance: usize,
        who: Who,
        uptime: Duration,
        how: &str,
        reason: String,
        fields: &[(&str, Value)],
    ) {
        let mut policy = self.plan.spec.policy.clone();
        // An app that has never served crashes at start: a bug or a missing dependency that
        // restarts will not fix. Give up soon, so that `herd run` exits non-zero within
        // seconds (as `herd start` fails) and an orchestrator sees it.
        let at_start = !self.ever_ready;
        if at_start {
            policy.max_restarts = policy.max_restarts.min(STARTUP_MAX_RESTARTS);
        }
        let slot = &mut self.slots[instance];
        if !policy.autorestart {
            self.logger.event(
                EventName::Exited,
                Some(who),
                &format!(
                    "exited ({how}) after {} — not restarting (--no-autorestart)",
                    human(uptime)
                ),
                fields,
            );
            self.set_slot_state(instance, SlotState::Errored { why: reason });
            self.check_all_errored();
            return;
        }
        // Before any worker was ready, dying is failing to start however long it took: a
        // slow machine must not turn a crash at start into a "stable" run.
        let counted = if at_start { Duration::ZERO } else { uptime };
        match slot.backoff.on_exit(counted, &policy) {
            Verdict::Restart(delay) => {
                slot.restarts += 1;
                self.set_slot_state(instance, SlotState::RestartDue);
                self.logger.event(
                    EventName::Exited,
                    Some(who),
                    &format!(
                        "exited ({how}) after {} — restarting in {}",
                        human(uptime),
                        human(delay)
                    ),
                    fields,
                );
                // The exit's sentence said it: the text log gets it once.
                self.logger.record(
                    EventName::Restarting,
                    Some(who),
                    &format!("restarting in {}", human(delay)),
                    &[("delay_ms", json!(delay.as_millis() as u64))],
                );
                self.after(delay, Event::RestartDue { instance });
            }
            Verdict::GiveUp => {
                let unstable = slot.backoff.unstable;
                self.logger.event(
                    EventName::Exited,
                    Some(who),
                    &format!("exited ({how}) after {}", human(uptime)),
                    fields,
                );
                self.logger.event(
                    EventName::Errored,
                    Some(who),
                    &if at_start {
                        format!(
                            "errored: {unstable} runs in a row died and no worker has been ready yet; giving up on this slot. Last exit: {reason}"
                        )
                    } else {
                        format!(
                            "errored: {} restarts in a row each died before --min-uptime {}; giving up on this slot. Last exit: {reason}",
                            unstable - 1,
                            human(policy.min_uptime)
                        )
                    },
                    &[("reason", json!(reason))],
                );
                self.set_slot_state(instance, SlotState::Errored { why: reason });
                self.check_all_errored();
                self.check_op();
            }
        }
    }

    pub(super) fn check_all_errored(&mut self) {
        if !self.phase.is_stopping()
            && self
                .slots
                .iter()
                .all(|s| s.state.is_errored() && s.incoming.is_none())
        {
            let why = if self.ever_ready {
                "every worker slot errored — exiting with code 1"
            } else {
                "every worker slot errored before any worker was ready: the app fails at start (see its errors above) — exiting with code 1"
            };
            self.logger.event(EventName::Errored, None, why, &[]);
            self.stop_all(1);
        }
    }

    pub(super) fn on_ipc_closed(&mut self, id: WorkerId, reason: Option<String>) {
        if let Some(reason) = reason {
            if let Some(w) = self
                .workers
                .get_mut(&id)
                .filter(|w| !w.state().is_being_stopped())
            {
                w.channel = None;
                let who = w.who();
                self.logger.event(
                    EventName::IpcError,
                    Some(who),
                    &format!(
                        "IPC channel broken: {reason} — killing the worker; its slot restarts"
                    ),
                    &[],
                );
                self.os
                    .signal_group(&w.leader, rustix::process::Signal::TERM);
                let grace = self.plan.spec.policy.kill_timeout.min(TERM_GRACE);
                self.after(
                    grace,
                    Event::KillDue {
                        id,
                        signal: rustix::process::Signal::KILL,
                        after: format!("SIGTERM and {}", human(grace)),
                    },
                );
            }
        }
        // A worker herd is stopping finished its disconnect (Node closes the channel once its
        // servers are closed and their connections answered). One that stays (a live thread,
        // a timer) gets SIGTERM now, not at half `--kill-timeout`: after a moment, so that
        // one exiting anyway is not told to.
        if self
            .workers
            .get(&id)
            .is_some_and(|w| w.state().is_draining() && !w.termed)
        {
            let grace = AFTER_DISCONNECT.min(self.plan.spec.policy.kill_timeout / 2);
            self.after(
                grace,
                Event::KillDue {
                    id,
                    signal: rustix::process::Signal::TERM,
                    after: format!("its disconnect finished and {}", human(grace)),
                },
            );
        }
        // EOF: the worker is leaving (disconnect, crash or exit). Route around it now; its
        // exit decides what happens to the slot. Node workers exit when their channel
        // closes; one that does not is made to, so its slot does not sit idle.
        if self
            .workers
            .get(&id)
            .is_some_and(|w| !w.state().is_being_stopped())
        {
            let grace = self.plan.spec.policy.kill_timeout;
            self.after(
                grace,
                Event::KillDue {
                    id,
                    signal: rustix::process::Signal::TERM,
                    after: format!("its IPC channel closed and --kill-timeout {}", human(grace)),
                },
            );
        }
        let Some(mut w) = self.workers.remove(&id) else {
            return;
        };
        self.detach(&mut w);
        self.workers.insert(id, w);
    }

    /// Slots whose current worker counts as ready (see [`WorkerState::counts_ready`]) and
    /// is not hung: what `herd status`, `/ready` and the manager are told.
    pub(super) fn ready_slots(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| {
                s.worker
                    .and_then(|id| self.workers.get(&id))
                    .is_some_and(|w| w.state().counts_ready() && !w.state().is_hung())
            })
            .count()
    }

    pub(super) fn mark_ready(&mut self, id: WorkerId, via: &str) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let Some(ready) = w.state().on_ready(tokio::time::Instant::now()) else {
            return;
        };
        w.set_state(ready);
        w.last_watchdog = tokio::time::Instant::now();
        let who = w.who();
        let servers = w.servers.clone();
        let promote = (w.role == Role::Incoming).then_some(w.instance);
        let ms = w.started.elapsed().as_millis() as u64;
        self.ever_ready = true;
        self.logger.event(
            EventName::Ready,
            Some(who),
            &format!("ready ({via}) in {ms}ms"),
            &[("via", json!(via)), ("ms", json!(ms))],
        );
        if let Some(instance) = promote {
            self.promote(id, instance);
        }
        // Kernel balancing: route to it before anyone is told it is ready.
        self.reroute();
        for s in servers {
            self.drain(s);
        }
        let ready = self.ready_slots();
        if !self.all_ready && ready == self.slots.len() {
            self.all_ready = true;
            self.tell_manager(&format!("READY=1\nSTATUS={ready} workers ready"));
            self.logger.event(
                EventName::AllReady,
                None,
                &format!("all {ready} workers ready"),
                &[("ready", json!(ready))],
            );
        }
        self.check_op();
    }

    /// A ready Node worker's `process.send({herd: 'unready', reason})`: out of the rotation
    /// (round-robin skips it; hash/sticky: its slot leaves the live set), not counted ready,
    /// not replaced for it; the watchdog and health checks still watch it.
    pub(super) fn declared_unready(&mut self, id: WorkerId, reason: &str) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        // A reason is for people: one short line.
        let mut reason: String = reason
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        if reason.is_empty() {
            reason = "no reason given".into();
        }
        let Some(next) = w
            .state()
            .on_unready(tokio::time::Instant::now(), reason.clone())
        else {
            return;
        };
        w.set_state(next);
        w.status = Some(reason.clone());
        let who = w.who();
        self.logger.event(
            EventName::Unready,
            Some(who),
            &format!("unready: {reason}"),
            &[("reason", json!(reason))],
        );
        self.reroute();
        // The last ready one gone: what waits goes to the unready ones (only_unready_left).
        for s in self.servers.ids().collect::<Vec<_>>() {
            self.drain(s);
        }
    }

    /// Its `process.send({herd: 'ready'})` after `unready`: back in the rotation.
    pub(super) fn declared_ready(&mut self, id: WorkerId) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let Some(next) = w.state().on_rejoin(tokio::time::Instant::now()) else {
            return;
        };
        w.set_state(next);
        w.status = None;
        let who = w.who();
        let servers = w.servers.clone();
        self.logger.event(
            EventName::Ready,
            Some(who),
            "ready again",
            &[("via", json!("message"))],
        );
        self.reroute();
        for s in servers {
            self.drain(s);
        }
    }

    pub(super) fn on_notify(
        &mut self,
        id: WorkerId,
        messages: Vec<Notify>,
        malformed: Vec<String>,
    ) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let who = w.who();
        for m in malformed {
            self.logger.event(
                EventName::NotifyError,
                Some(who),
                &format!("ignored a notify message: {m}"),
                &[],
            );
        }
        for message in messages {
            match message {
                Notify::Ready => {
                    if matches!(self.plan.ready, Ready::Notify | Ready::Delay(_)) {
                        self.mark_ready(id, "notify");
                    }
                }
                Notify::Status(text) => {
                    if let Some(w) = self.workers.get_mut(&id) {
                        w.status = Some(text);
                    }
                }
                Notify::Watchdog => {
                    if let Some(w) = self.workers.get_mut(&id) {
                        w.last_watchdog = tokio::time::Instant::now();
                    }
                }
                Notify::Stopping => {
                    if let Some(w) = self.workers.get_mut(&id) {
                        if let Some(next) = w.state().on_leaving(tokio::time::Instant::now()) {
                            w.set_state(next);
                        }
                    }
                }
                Notify::Errno(n) => {
                    self.logger.event(
                        EventName::Notify,
                        Some(who),
                        &format!("reports errno {n}"),
                        &[("errno", json!(n))],
                    );
                }
                _ => {}
            }
        }
    }
}

/// The `exited` event's fields.
fn exit_fields(
    status: &io::Result<ExitStatus>,
    uptime: Duration,
    expected: bool,
    hung: bool,
) -> [(&'static str, Value); 5] {
    let (code, signal) = match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            (s.code(), s.signal())
        }
        Err(_) => (None, None),
    };
    // Why it is gone: asked to stop (stop, reload, scale, a health replacement), or on its
    // own (crash), or killed as hung.
    let reason = if hung {
        "hung"
    } else if expected {
        "stopped"
    } else {
        "crash"
    };
    [
        ("code", json!(code)),
        ("signal", json!(signal)),
        ("uptime_ms", json!(uptime.as_millis() as u64)),
        ("expected", json!(expected)),
        ("reason", json!(reason)),
    ]
}

/// `how` it exited, with the last lines it printed that explain it.
fn with_last_output(how: &str, w: &super::worker::Worker) -> String {
    let tail: Vec<String> = w.tail.borrow().iter().cloned().collect();
    let shown = crate::logs::explain(&tail);
    if shown.is_empty() {
        how.to_string()
    } else {
        format!("{how}; last output: {}", shown.join(" ⏎ "))
    }
}
