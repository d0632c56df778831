//! The supervisor: one app's worker slots, their lifecycle, restarts and stop.
//!
//! # Theory of operation
//!
//! Everything runs on one single-threaded tokio runtime. Small tasks watch the outside world
//! — each worker's exit, IPC channel, notify socket and output pipes, each round-robin
//! listener's accept loop, timers and signals — and report [`Event`]s on one channel. The
//! [`Supervisor`] owns all state and handles one event at a time, so there are no locks and
//! every transition is visible in one place.
//!
//! A slot (instance 0..N-1) holds at most one current worker, and one [`slot::SlotState`]:
//! active, waiting out a restart backoff, respawning (`herd restart`) or errored. A worker goes
//! `starting → online (Node) → ready → draining → exited`, or leaves on its own, or is found
//! hung: one [`state::WorkerState`], changed only through `Worker::set_state`, which refuses a
//! transition the machine does not have. The app's phase (running, an operation, stopping) is
//! one [`phase::AppPhase`]. docs/architecture.md draws all three. *Ready* comes from Node's
//! `listening`, `process.send('ready')` (`--ready message`), `READY=1` on the notify socket,
//! or a delay (`--ready delay:D`; the default for socket-activation workers is `READY=1` or
//! 1s up, whichever comes first). Round-robin and sticky route only to ready workers.
//!
//! A worker that exits without being asked crashed: its slot restarts it after a backoff
//! ([`restart`]); too many unstable restarts in a row mark the slot errored, and when every
//! slot is errored herd exits 1.
//!
//! | signal to herd | effect |
//! |---|---|
//! | `SIGTERM`, `SIGINT` | graceful stop: Node workers get `disconnect`, others `SIGTERM`; `SIGKILL` after `--kill-timeout`. With `--drain-delay D`, first D of serving while `/ready` says 503 ([`observe`]) |
//! | second `SIGINT` | during a drain: the graceful stop now; during the stop: `SIGKILL` every worker now |
//!
//! Stopping a worker takes it out of routing first, then asks it to close: in-flight
//! requests finish. Each worker is its own process group, and the whole group is signalled.

mod cluster;
mod health;
mod kernel;
mod lifecycle;
mod observe;
pub mod ops;
mod phase;
mod reconfigure;
mod refuse;
pub mod restart;
mod routing;
mod slot;
pub mod state;
pub mod status;
#[cfg(test)]
mod tests;
pub mod worker;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use herd_proto::control::{Reason, Request, Response};
use herd_proto::event::EventName;
use serde_json::json;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;

use crate::fmt::human;
use crate::logs::Logger;
use crate::node::servers::Servers;
use crate::os::Os;
use crate::plan::Plan;
use crate::spec::WorkerKind;
use restart::Backoff;
use worker::{Launcher, Worker};

pub use crate::vocab::{Event, SignalKind, WorkerId};
use phase::AppPhase;
use slot::SlotState;
use state::DrainReason;

/// Why a worker may not have become ready, and what to do: for the `ready_timeout` event.
fn not_ready_hint(ready: &crate::spec::Ready) -> String {
    use crate::spec::Ready;
    match ready {
        Ready::Listening => "it has not listened on any port through herd. An app that forks its own \
            cluster (`cluster.fork()`) serves nothing under herd: run its worker file instead; one \
            that binds its own socket (not a cluster server) is not reachable through herd; a worker \
            that serves nothing needs `--ready delay:D`. See docs/compat.md"
            .into(),
        Ready::Message => "it has not sent `process.send('ready')` (--ready message / --wait-ready)".into(),
        Ready::Notify => "it has not sent READY=1 to NOTIFY_SOCKET (--ready notify); a server that \
            never does needs `--ready delay:D`. See docs/compat.md"
            .into(),
        Ready::Delay(d) => format!("--ready delay:{} is longer than --listen-timeout", human(*d)),
    }
}

/// How long a Node worker whose IPC channel closed on its own (not stopped by herd) gets
/// between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// How long a Node worker herd is stopping may stay after its disconnect finished (its IPC
/// channel closed) before SIGTERM: long enough for one that is exiting anyway.
const AFTER_DISCONNECT: Duration = Duration::from_millis(250);

struct Slot {
    /// The worker that serves this slot.
    worker: Option<WorkerId>,
    /// Reload: its replacement, not yet ready.
    incoming: Option<WorkerId>,
    backoff: Backoff,
    restarts: u32,
    /// Active, waiting out a backoff, respawning (`herd restart`) or errored; changed only
    /// by [`Supervisor::set_slot_state`].
    state: SlotState,
    last_exit: Option<String>,
    /// Scale-down: removed once its worker is gone. Beside `state`, not in it: a slot in
    /// any state but `Respawning` can be scaled away (see [`slot`]).
    retiring: bool,
    /// Replacements by reason.
    reasons: BTreeMap<Reason, u32>,
}

impl Slot {
    fn new(policy: &crate::spec::Policy) -> Self {
        Slot {
            worker: None,
            incoming: None,
            backoff: Backoff::new(policy),
            restarts: 0,
            state: SlotState::Active,
            last_exit: None,
            retiring: false,
            reasons: Default::default(),
        }
    }
}

pub struct Supervisor {
    plan: Rc<Plan>,
    logger: Logger,
    tx: UnboundedSender<Event>,
    launcher: Launcher,
    /// Signals and /proc readings go through it (a fake in unit tests).
    os: Rc<dyn Os>,
    slots: Vec<Slot>,
    workers: BTreeMap<WorkerId, Worker>,
    next_id: WorkerId,
    servers: Servers,
    /// Running, running an operation, or stopping (see [`phase`]).
    phase: AppPhase,
    all_ready: bool,
    /// Some worker of the app has been ready since herd started: until then a slot gives
    /// up after [`lifecycle::STARTUP_MAX_RESTARTS`] unstable restarts, not `--max-restarts`.
    ever_ready: bool,
    /// Socket activation, `shared`: since when no worker has been ready, whether herd
    /// refuses connections now, and its accept threads (see [`refuse`]).
    nothing_serves_since: Option<tokio::time::Instant>,
    refusing: bool,
    refusers: Vec<crate::balance::AcceptThread>,
    /// … and whether anyone accepts from its listeners while workers are ready.
    queue_check_due: Option<tokio::time::Instant>,
    queue_watch: Vec<refuse::QueueWatch>,
    run_dir: PathBuf,
    /// Graceful replacements (health, limits) waiting their turn.
    replacements: std::collections::VecDeque<(WorkerId, Reason)>,
    stop_replies: Vec<oneshot::Sender<Response>>,
    started: tokio::time::Instant,
    /// herd's own service manager (systemd `Type=notify`), if any.
    manager: Option<crate::sdnotify::Manager>,
    control_path: Option<PathBuf>,
    /// When the health tick last read /proc.
    last_sample: Option<tokio::time::Instant>,
    /// `--balance hash|sticky`: slots that had a ready worker at the last reroute.
    was_ready: BTreeSet<usize>,
    /// `--balance sticky`: empty slots that keep their clients, until when.
    held: BTreeMap<usize, tokio::time::Instant>,
    /// Socket activation, hash and sticky: (listener, slot) sockets of slots that will not
    /// have a worker again, whose queued connections herd closes.
    /// Their accept threads (kept, idle, once the slot comes back).
    closers: BTreeMap<(usize, usize), crate::balance::AcceptThread>,
    /// Where the app came from, for `herd ls` and `herd apply` (see [`reconfigure`]).
    origin: reconfigure::Origin,
    /// `--http`'s counters and sample ring, and `--drain-delay` (see [`observe`]).
    observe: observe::Observe,
}

impl Supervisor {
    pub fn new(plan: Plan, logger: Logger, run_dir: PathBuf) -> (Self, UnboundedReceiver<Event>) {
        Self::with_os(plan, logger, run_dir, Rc::new(crate::os::System))
    }

    /// A supervisor whose workers are started, signalled and measured through `os`.
    pub fn with_os(
        plan: Plan,
        logger: Logger,
        run_dir: PathBuf,
        os: Rc<dyn Os>,
    ) -> (Self, UnboundedReceiver<Event>) {
        let (tx, rx) = unbounded_channel();
        let plan = Rc::new(plan);
        let launcher = Launcher::new(
            Rc::clone(&plan),
            logger.clone(),
            tx.clone(),
            run_dir.clone(),
            Rc::clone(&os),
        );
        let slots = (0..plan.instances)
            .map(|_| Slot::new(&plan.spec.policy))
            .collect();
        let sup = Supervisor {
            plan,
            logger,
            tx,
            launcher,
            os,
            slots,
            workers: BTreeMap::new(),
            next_id: 1,
            servers: Servers::default(),
            phase: AppPhase::Running,
            all_ready: false,
            ever_ready: false,
            nothing_serves_since: None,
            refusing: false,
            refusers: Vec::new(),
            queue_check_due: None,
            queue_watch: Vec::new(),
            run_dir,
            replacements: std::collections::VecDeque::new(),
            stop_replies: Vec::new(),
            started: tokio::time::Instant::now(),
            manager: crate::sdnotify::Manager::from_env(),
            control_path: None,
            last_sample: None,
            was_ready: BTreeSet::new(),
            held: BTreeMap::new(),
            closers: BTreeMap::new(),
            origin: reconfigure::Origin::default(),
            observe: observe::Observe::default(),
        };
        (sup, rx)
    }

    pub fn sender(&self) -> UnboundedSender<Event> {
        self.tx.clone()
    }

    pub fn logger(&self) -> Logger {
        self.logger.clone()
    }

    /// The control socket to remove when the app stops, before `herd stop` is answered.
    pub fn set_control_path(&mut self, path: PathBuf) {
        self.control_path = Some(path);
    }

    /// Starts every slot's first worker.
    pub fn start(&mut self) {
        for l in self.plan.listeners.iter() {
            self.logger.event(
                EventName::Bound,
                None,
                &format!("listening on {}", l.addr),
                &[("address", json!(l.addr.to_string()))],
            );
        }
        let what = match self.plan.kind {
            WorkerKind::Node => format!("Node cluster workers, balance {}", self.plan.balance),
            WorkerKind::SocketActivation => "socket-activation workers".to_string(),
        };
        self.logger.event(
            EventName::Starting,
            None,
            &format!(
                "starting {} {what}: {}",
                self.plan.instances,
                self.plan.program.display()
            ),
            &[
                ("instances", json!(self.plan.instances)),
                ("balance", json!(self.plan.balance.to_string())),
            ],
        );
        for instance in 0..self.slots.len() {
            self.start_worker(instance, false);
        }
        self.start_health();
    }

    /// The exit code once the supervisor is done.
    pub fn finished(&self) -> Option<i32> {
        self.phase.exit_code().filter(|_| self.workers.is_empty())
    }

    /// Runs until every worker is gone after a stop.
    pub async fn run(mut self, mut rx: UnboundedReceiver<Event>) -> i32 {
        self.start();
        let mut code = 1;
        while let Some(event) = rx.recv().await {
            self.handle(event);
            if let Some(done) = self.finished() {
                code = done;
                break;
            }
        }
        self.servers.shutdown().await;
        self.cleanup();
        for reply in self.stop_replies.drain(..) {
            let _ = reply.send(Response::ok("stopped"));
        }
        // Let the control clients write their answers before the runtime goes away.
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
        code
    }

    fn cleanup(&mut self) {
        if let Some(path) = &self.control_path {
            let _ = std::fs::remove_file(path);
        }
        self.servers.clear();
        self.plan.remove_socket_files();
        let _ = std::fs::remove_dir_all(&self.run_dir);
        self.logger.event(EventName::Stopped, None, "stopped", &[]);
    }

    pub fn handle(&mut self, event: Event) {
        self.on_event(event);
        self.reroute();
        self.refuse_while_nothing_serves();
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Exited { id, status } => self.on_exit(id, status),
            Event::Ipc { id, msg } => self.on_ipc(id, msg),
            Event::IpcClosed { id, reason } => self.on_ipc_closed(id, reason),
            Event::IpcWritable { id } => {
                if let Some(w) = self.workers.get_mut(&id) {
                    w.write_waiting = false;
                    w.send(&self.tx, |c| c.flush());
                }
            }
            Event::Notify {
                id,
                messages,
                malformed,
            } => self.on_notify(id, messages, malformed),
            Event::Conns { server, conns } => {
                for conn in conns {
                    self.route(server, conn);
                }
            }
            Event::UnixBound { key } => self.unix_bound(key),
            Event::AcceptFailed { server, error } => {
                let name = self
                    .servers
                    .get(server)
                    .map(|s| s.display.clone())
                    .unwrap_or_default();
                self.logger.event(
                    EventName::Error,
                    None,
                    &format!("accepting on {name} failed: {error}"),
                    &[],
                );
            }
            Event::RestartDue { instance } => {
                let Some(slot) = self.slots.get(instance) else {
                    return;
                };
                if slot.state.is_restart_due() {
                    self.set_slot_state(instance, SlotState::Active);
                }
                let slot = &self.slots[instance];
                let wanted = slot.worker.is_none() && !slot.state.is_errored() && !slot.retiring;
                if !self.phase.is_stopping() && wanted {
                    self.start_worker(instance, false);
                }
            }
            Event::ReadyDue { id } => self.mark_ready(id, "started"),
            Event::ReadyTimeout { id } => {
                if let Some(w) = self.workers.get(&id).filter(|w| w.state().awaiting_ready()) {
                    let who = w.who();
                    let limit = self.plan.spec.policy.listen_timeout;
                    if w.role == state::Role::Incoming {
                        let instance = w.instance;
                        let why = format!("not ready within --listen-timeout {}", human(limit));
                        self.logger
                            .event(EventName::ReadyTimeout, Some(who), &why, &[]);
                        self.incoming_failed(id, instance, why);
                        return;
                    }
                    // Not ready means not serving: it stays out of routing and out of the
                    // ready count (`herd start` fails on it), and becomes ready if it ever
                    // sends its signal.
                    let hint = not_ready_hint(&self.plan.ready);
                    self.logger.event(
                        EventName::ReadyTimeout,
                        Some(who),
                        &format!("not ready after --listen-timeout {}: {hint}", human(limit)),
                        &[],
                    );
                    if let Some(w) = self.workers.get_mut(&id) {
                        w.late = true;
                    }
                    self.check_op();
                }
            }
            Event::KillDue { id, signal, after } => self.kill_due(id, signal, &after),
            Event::Signal(kind) => self.on_signal(kind),
            Event::Control { request, reply } => self.on_control(request, reply),
            Event::Tick => self.on_tick(),
            Event::Reroute => {}
            Event::ProbeConn { id, conn } => self.on_probe_conn(id, conn),
            Event::Probe { id, result } => self.on_probe(id, result),
            Event::Observe(query) => self.on_observe(query),
            Event::DrainOver => self.drain_over("--drain-delay is over"),
        }
    }

    fn on_control(&mut self, request: Request, reply: oneshot::Sender<Response>) {
        match request {
            Request::Status => {
                let mut response = Response::ok("");
                response.status = Some(self.status());
                let _ = reply.send(response);
            }
            Request::Reload { parallel } => self.begin(
                ops::OpKind::Reload {
                    parallel: parallel.max(1),
                },
                Some(reply),
            ),
            Request::Reconfigure { parallel, args } => self.reconfigure(parallel, args, reply),
            Request::Restart => self.begin(ops::OpKind::Restart, Some(reply)),
            Request::RestartWorker { instance } => {
                self.begin(ops::OpKind::RestartWorker { instance }, Some(reply))
            }
            Request::Scale { to } => match ops::scale_target(&to, self.live_slots()) {
                Ok(to) => self.begin(ops::OpKind::Scale { to }, Some(reply)),
                Err(e) => {
                    let _ = reply.send(Response::error(e));
                }
            },
            Request::Stop => {
                self.stop_replies.push(reply);
                if !self.phase.is_stopping() {
                    self.stop_requested("herd stop");
                }
            }
            Request::Send { data, instance } => {
                let line = match crate::node::channel::user_line(&data) {
                    Ok(line) => line,
                    Err(why) => {
                        let _ = reply.send(Response::error(format!("not sent: {why}")));
                        return;
                    }
                };
                let mut sent = 0;
                for w in self.workers.values_mut() {
                    if instance.is_none_or(|i| i == w.instance)
                        && !w.state().is_draining()
                        && w.send(&self.tx, |c| c.user(Rc::clone(&line)))
                    {
                        sent += 1;
                    }
                }
                let _ = reply.send(if sent > 0 {
                    Response::ok(format!("sent to {sent} workers"))
                } else if self.plan.kind == WorkerKind::SocketActivation {
                    Response::error(
                        "this app's workers have no message channel (only Node workers do)",
                    )
                } else {
                    Response::error("no worker matched")
                });
            }
            Request::Logs { .. } => {
                let _ = reply.send(Response::error("logs are served by the control task"));
            }
        }
    }

    fn on_signal(&mut self, kind: SignalKind) {
        match kind {
            SignalKind::Hangup => return self.begin(ops::OpKind::Reload { parallel: 1 }, None),
            SignalKind::MoreWorkers | SignalKind::FewerWorkers => {
                let to = if kind == SignalKind::MoreWorkers {
                    "+1"
                } else {
                    "-1"
                };
                match ops::scale_target(to, self.live_slots()) {
                    Ok(to) => self.begin(ops::OpKind::Scale { to }, None),
                    Err(e) => self.logger.event(
                        EventName::Refused,
                        None,
                        &format!("scale refused: {e}"),
                        &[],
                    ),
                }
                return;
            }
            SignalKind::Terminate | SignalKind::Interrupt => {}
        }
        let graceful = matches!(self.phase, AppPhase::Stopping { forced: false, .. });
        match (self.phase.is_stopping(), kind) {
            (false, SignalKind::Interrupt) if self.observe.draining => {
                self.drain_over("second SIGINT: drain cut short");
            }
            (false, _) => {
                let name = if kind == SignalKind::Interrupt {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                self.stop_requested(name);
            }
            (true, SignalKind::Interrupt) if graceful => {
                self.logger.event(
                    EventName::Stopping,
                    None,
                    "second SIGINT: killing every worker now",
                    &[],
                );
                self.change_phase(AppPhase::force);
                for w in self.workers.values() {
                    self.os
                        .signal_group(&w.leader, rustix::process::Signal::KILL);
                }
            }
            _ => {}
        }
    }

    /// Tells herd's own service manager something, if there is one.
    pub(super) fn tell_manager(&self, text: &str) {
        if let Some(m) = &self.manager {
            m.send(text);
        }
    }

    pub(super) fn stop_all(&mut self, code: i32) {
        self.tell_manager("STOPPING=1");
        self.change_phase(|p| p.stop(code));
        for server in self.servers.ids().collect::<Vec<_>>() {
            if let Some(s) = self.servers.get_mut(server) {
                if let Some(task) = s.accept_task.take() {
                    task.abort();
                }
                s.drains.clear();
                if let Some((_, task)) = s.drain_hand.take() {
                    task.abort();
                }
            }
        }
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            self.stop_worker(id, DrainReason::Stop);
        }
    }

    /// Changes the app's phase through one of [`AppPhase`]'s transitions and records it (a
    /// `state` event in JSON logs). One the machine does not have is a bug in herd: refused,
    /// logged, and fatal in debug builds (the tests).
    pub(super) fn change_phase<T>(
        &mut self,
        change: impl FnOnce(&mut AppPhase) -> Result<T, phase::Invalid>,
    ) -> Option<T> {
        let from = self.phase.name();
        match change(&mut self.phase) {
            Ok(done) => {
                let to = self.phase.name();
                if from != to {
                    self.logger.transition(None, from, to, &[]);
                }
                Some(done)
            }
            Err(invalid) => {
                self.logger.event(
                    EventName::Error,
                    None,
                    &format!(
                        "herd bug: invalid app phase change {} → {}, ignored",
                        invalid.from, invalid.to
                    ),
                    &[],
                );
                debug_assert!(false, "invalid app phase change {invalid:?}");
                None
            }
        }
    }

    /// Changes slot `instance`'s state through one of [`SlotState`]'s transitions. One the
    /// machine does not have is a bug in herd: refused, logged, and fatal in debug builds.
    /// Valid changes are not logged as events of their own: the events that cause them
    /// (`restarting`, `errored`, `restart`) already say so.
    pub(super) fn set_slot_state(&mut self, instance: usize, next: SlotState) {
        let Some(slot) = self.slots.get_mut(instance) else {
            return;
        };
        if let Err(invalid) = slot.state.advance(next) {
            self.logger.event(
                EventName::Error,
                None,
                &format!(
                    "herd bug: invalid state change {} → {} for {}[{instance}]'s slot, ignored",
                    invalid.from, invalid.to, self.plan.spec.name
                ),
                &[],
            );
            debug_assert!(false, "invalid slot state change {invalid:?}");
        }
    }

    /// Slot `instance` got a worker by other means than its restart timer (a reload's
    /// replacement, `herd scale` taking a retiring slot back): it is active again.
    pub(super) fn slot_filled(&mut self, instance: usize) {
        if let Some(next) = self.slots.get(instance).and_then(|s| s.state.on_filled()) {
            self.set_slot_state(instance, next);
        }
    }

    /// Ends the operation in progress, if any (see [`AppPhase::finish`]).
    pub(super) fn finish_op(&mut self) -> Option<ops::Op> {
        self.change_phase(|p| Ok(p.finish())).flatten()
    }

    pub(super) fn after(&self, delay: Duration, event: Event) {
        let tx = self.tx.clone();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(event);
        });
    }
}
