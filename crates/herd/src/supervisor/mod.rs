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
//! A slot (instance 0..N-1) holds at most one current worker. A worker goes
//! `starting → online (Node) → ready → stopping → exited`. *Ready* comes from Node's
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
//! | `SIGTERM`, `SIGINT` | graceful stop: Node workers get `disconnect`, others `SIGTERM`; `SIGKILL` after `--kill-timeout` |
//! | second `SIGINT` | `SIGKILL` every worker now |
//!
//! Stopping a worker takes it out of routing first, then asks it to close: in-flight
//! requests finish. Each worker is its own process group, and the whole group is signalled.

mod health;
pub mod ops;
pub mod restart;
pub mod status;
pub mod worker;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::rc::Rc;
use std::time::Duration;

use herd_proto::control::{Request, Response};
use herd_proto::notify::Message as Notify;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;

use crate::balance::{self, AcceptGate, Pending};
use crate::logs::{Logger, Who};
use crate::node::channel::Ipc;
use crate::node::servers::{self, ServerId, Servers};
use crate::plan::Plan;
use crate::spec::{Balance, Ready, WorkerKind};
use restart::{Backoff, Verdict};
use worker::{Launcher, Worker};

pub type WorkerId = u64;

/// How long a Node worker that ignored `disconnect` and then SIGTERM gets before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// Something happened that the supervisor must handle.
#[derive(Debug)]
pub enum Event {
    Exited {
        id: WorkerId,
        status: io::Result<ExitStatus>,
    },
    Ipc {
        id: WorkerId,
        msg: Ipc,
    },
    IpcClosed {
        id: WorkerId,
        reason: Option<String>,
    },
    IpcWritable {
        id: WorkerId,
    },
    Notify {
        id: WorkerId,
        messages: Vec<Notify>,
        malformed: Vec<String>,
    },
    Conn {
        server: ServerId,
        conn: Pending,
    },
    AcceptFailed {
        server: ServerId,
        error: String,
    },
    RestartDue {
        instance: usize,
    },
    ReadyDue {
        id: WorkerId,
    },
    ReadyTimeout {
        id: WorkerId,
    },
    KillDue {
        id: WorkerId,
        signal: rustix::process::Signal,
    },
    /// Once a second, when a health check or limit is on.
    Tick,
    Probe {
        id: WorkerId,
        result: Result<u16, String>,
    },
    Signal(SignalKind),
    Control {
        request: Request,
        reply: oneshot::Sender<Response>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalKind {
    Terminate,
    Interrupt,
    /// SIGHUP: rolling reload.
    Hangup,
    /// SIGTTIN: one more worker.
    MoreWorkers,
    /// SIGTTOU: one fewer worker.
    FewerWorkers,
}

struct Slot {
    /// The worker that serves this slot.
    worker: Option<WorkerId>,
    /// Reload: its replacement, not yet ready.
    incoming: Option<WorkerId>,
    backoff: Backoff,
    restarts: u32,
    restart_pending: bool,
    errored: Option<String>,
    last_exit: Option<String>,
    /// Scale-down: removed once its worker is gone.
    retiring: bool,
    /// Restart: start a new worker once the current one is gone.
    respawn: bool,
    /// Replacements by reason (`crash`, `hung`, `memory`, `reload`, …).
    reasons: std::collections::BTreeMap<&'static str, u32>,
}

impl Slot {
    fn new(policy: &crate::spec::Policy) -> Self {
        Slot {
            worker: None,
            incoming: None,
            backoff: Backoff::new(policy),
            restarts: 0,
            restart_pending: false,
            errored: None,
            last_exit: None,
            retiring: false,
            respawn: false,
            reasons: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Stopping { code: i32, forced: bool },
}

pub struct Supervisor {
    plan: Rc<Plan>,
    logger: Logger,
    tx: UnboundedSender<Event>,
    launcher: Launcher,
    slots: Vec<Slot>,
    workers: BTreeMap<WorkerId, Worker>,
    next_id: WorkerId,
    servers: Servers,
    phase: Phase,
    all_ready: bool,
    run_dir: PathBuf,
    op: Option<ops::Op>,
    /// Graceful replacements (health, limits) waiting their turn.
    replacements: std::collections::VecDeque<(WorkerId, &'static str)>,
    /// herd's end of Node health probes.
    probe_listener: Option<std::net::TcpListener>,
    stop_replies: Vec<oneshot::Sender<Response>>,
    started: std::time::Instant,
    /// herd's own service manager (systemd `Type=notify`), if any.
    manager: Option<crate::sdnotify::Manager>,
    control_path: Option<PathBuf>,
    /// When the health tick last read /proc.
    last_sample: Option<std::time::Instant>,
}

impl Supervisor {
    pub fn new(plan: Plan, logger: Logger, run_dir: PathBuf) -> (Self, UnboundedReceiver<Event>) {
        let (tx, rx) = unbounded_channel();
        let plan = Rc::new(plan);
        let launcher = Launcher::new(
            Rc::clone(&plan),
            logger.clone(),
            tx.clone(),
            run_dir.clone(),
        );
        let slots = (0..plan.instances)
            .map(|_| Slot::new(&plan.spec.policy))
            .collect();
        let sup = Supervisor {
            plan,
            logger,
            tx,
            launcher,
            slots,
            workers: BTreeMap::new(),
            next_id: 1,
            servers: Servers::default(),
            phase: Phase::Running,
            all_ready: false,
            run_dir,
            op: None,
            replacements: std::collections::VecDeque::new(),
            probe_listener: None,
            stop_replies: Vec::new(),
            started: std::time::Instant::now(),
            manager: crate::sdnotify::Manager::from_env(),
            control_path: None,
            last_sample: None,
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
        for l in &self.plan.listeners {
            self.logger.event(
                "bound",
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
            "starting",
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
        match self.phase {
            Phase::Stopping { code, .. } if self.workers.is_empty() => Some(code),
            _ => None,
        }
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
        self.logger.event("stopped", None, "stopped", &[]);
    }

    pub fn handle(&mut self, event: Event) {
        match event {
            Event::Exited { id, status } => self.on_exit(id, status),
            Event::Ipc { id, msg } => self.on_ipc(id, msg),
            Event::IpcClosed { id, reason } => self.on_ipc_closed(id, reason),
            Event::IpcWritable { id } => {
                if let Some(w) = self.workers.get_mut(&id) {
                    w.send(&self.tx, |c| c.flush());
                }
            }
            Event::Notify {
                id,
                messages,
                malformed,
            } => self.on_notify(id, messages, malformed),
            Event::Conn { server, conn } => self.route(server, conn),
            Event::AcceptFailed { server, error } => {
                let name = self
                    .servers
                    .get(server)
                    .map(|s| s.display.clone())
                    .unwrap_or_default();
                self.logger.event(
                    "error",
                    None,
                    &format!("accepting on {name} failed: {error}"),
                    &[],
                );
            }
            Event::RestartDue { instance } => {
                let Some(slot) = self.slots.get_mut(instance) else {
                    return;
                };
                slot.restart_pending = false;
                let wanted = slot.worker.is_none() && slot.errored.is_none() && !slot.retiring;
                if self.phase == Phase::Running && wanted {
                    self.start_worker(instance, false);
                }
            }
            Event::ReadyDue { id } => self.mark_ready(id, "started"),
            Event::ReadyTimeout { id } => {
                if let Some(w) = self.workers.get(&id).filter(|w| !w.ready && !w.stopping) {
                    let who = w.who();
                    let limit = self.plan.spec.policy.listen_timeout;
                    if w.incoming {
                        let instance = w.instance;
                        let why = format!("not ready within --listen-timeout {}", human(limit));
                        self.logger.event("ready_timeout", Some(who), &why, &[]);
                        self.incoming_failed(id, instance, why);
                        return;
                    }
                    self.logger.event(
                        "ready_timeout",
                        Some(who),
                        &format!(
                            "not ready after {} — counting it as started anyway",
                            human(limit)
                        ),
                        &[],
                    );
                    self.mark_ready(id, "timeout");
                }
            }
            Event::KillDue { id, signal } => self.kill_due(id, signal),
            Event::Signal(kind) => self.on_signal(kind),
            Event::Control { request, reply } => self.on_control(request, reply),
            Event::Tick => self.on_tick(),
            Event::Probe { id, result } => self.on_probe(id, result),
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
            Request::Restart => self.begin(ops::OpKind::Restart, Some(reply)),
            Request::Scale { to } => match ops::scale_target(&to, self.live_slots()) {
                Ok(to) => self.begin(ops::OpKind::Scale { to }, Some(reply)),
                Err(e) => {
                    let _ = reply.send(Response::error(e));
                }
            },
            Request::Stop => {
                self.stop_replies.push(reply);
                if self.phase == Phase::Running {
                    self.logger.event(
                        "stopping",
                        None,
                        &format!("stopping (herd stop): {} workers", self.workers.len()),
                        &[],
                    );
                    self.stop_all(0);
                }
            }
            Request::Send { data, instance } => {
                let line = data.to_string();
                let mut sent = 0;
                for w in self.workers.values_mut() {
                    if instance.is_none_or(|i| i == w.instance)
                        && !w.stopping
                        && w.send(&self.tx, |c| c.line(&line))
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
                    Err(e) => {
                        self.logger
                            .event("refused", None, &format!("scale refused: {e}"), &[])
                    }
                }
                return;
            }
            SignalKind::Terminate | SignalKind::Interrupt => {}
        }
        match (self.phase, kind) {
            (Phase::Running, _) => {
                let name = if kind == SignalKind::Interrupt {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                self.logger.event(
                    "stopping",
                    None,
                    &format!("stopping ({name}): {} workers", self.workers.len()),
                    &[],
                );
                self.stop_all(0);
            }
            (
                Phase::Stopping {
                    code,
                    forced: false,
                },
                SignalKind::Interrupt,
            ) => {
                self.logger.event(
                    "stopping",
                    None,
                    "second SIGINT: killing every worker now",
                    &[],
                );
                self.phase = Phase::Stopping { code, forced: true };
                for w in self.workers.values() {
                    signal_group(w.pid, rustix::process::Signal::KILL);
                }
            }
            _ => {}
        }
    }

    /// Tells herd's own service manager something, if there is one.
    fn tell_manager(&self, text: &str) {
        if let Some(m) = &self.manager {
            m.send(text);
        }
    }

    fn stop_all(&mut self, code: i32) {
        self.tell_manager("STOPPING=1");
        self.phase = Phase::Stopping {
            code,
            forced: false,
        };
        for server in self.servers.ids().collect::<Vec<_>>() {
            if let Some(s) = self.servers.get_mut(server) {
                if let Some(task) = s.accept_task.take() {
                    task.abort();
                }
            }
        }
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            self.stop_worker(id);
        }
    }

    /// Starts a worker in `instance`: its current worker, or (reload) its incoming one.
    fn start_worker(&mut self, instance: usize, incoming: bool) -> Option<WorkerId> {
        let id = self.next_id;
        self.next_id += 1;
        match self.launcher.launch(id, instance) {
            Ok(mut worker) => {
                let who = worker.who();
                worker.incoming = incoming;
                let what = if incoming { "replacement " } else { "" };
                self.logger.event(
                    "spawned",
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
                self.logger.event("spawn_failed", Some(who), &reason, &[]);
                // Retrying cannot fix a program that is missing or not executable for us.
                let hopeless = matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
                ) || e.raw_os_error() == Some(libc::ENOEXEC);
                if hopeless && !incoming {
                    self.logger.event(
                        "errored",
                        Some(who),
                        &format!("errored: {reason}"),
                        &[("reason", json!(reason))],
                    );
                    self.slots[instance].errored = Some(reason);
                    self.check_all_errored();
                } else if !incoming {
                    self.after_exit(instance, who, Duration::ZERO, &reason, reason.clone(), &[]);
                }
                None
            }
        }
    }

    fn after(&self, delay: Duration, event: Event) {
        let tx = self.tx.clone();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(event);
        });
    }

    fn stop_worker(&mut self, id: WorkerId) {
        let kill_timeout = self.plan.spec.policy.kill_timeout;
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.stopping {
            return;
        }
        w.stopping = true;
        let asked = w.send(&self.tx, |c| c.cluster(r#""act":"disconnect""#));
        let next = if asked {
            rustix::process::Signal::TERM
        } else {
            signal_group(w.pid, rustix::process::Signal::TERM);
            rustix::process::Signal::KILL
        };
        self.after(kill_timeout, Event::KillDue { id, signal: next });
    }

    fn kill_due(&mut self, id: WorkerId, signal: rustix::process::Signal) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let who = w.who();
        let sig = if signal == rustix::process::Signal::TERM {
            "SIGTERM"
        } else {
            "SIGKILL"
        };
        self.logger.event(
            "kill",
            Some(who),
            &format!("still running after --kill-timeout — sending {sig}"),
            &[],
        );
        signal_group(w.pid, signal);
        if signal == rustix::process::Signal::TERM {
            self.after(
                TERM_GRACE,
                Event::KillDue {
                    id,
                    signal: rustix::process::Signal::KILL,
                },
            );
        }
    }

    fn on_exit(&mut self, id: WorkerId, status: io::Result<ExitStatus>) {
        let Some(mut w) = self.workers.remove(&id) else {
            return;
        };
        // Whatever the worker left in its process group goes with it.
        signal_group(w.pid, rustix::process::Signal::KILL);
        let who = w.who();
        let uptime = w.started.elapsed();
        let how = match &status {
            Ok(s) => describe_status(s),
            Err(e) => format!("lost ({e})"),
        };
        let (code, signal) = match &status {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                (s.code(), s.signal())
            }
            Err(_) => (None, None),
        };
        let fields = [
            ("code", json!(code)),
            ("signal", json!(signal)),
            ("uptime_ms", json!(uptime.as_millis() as u64)),
            ("expected", json!(w.stopping)),
        ];
        self.detach(&mut w);
        let instance = w.instance;
        let tail: Vec<String> = w.tail.borrow().iter().cloned().collect();
        let shown = crate::logs::explain(&tail);
        let reason = if shown.is_empty() {
            how.clone()
        } else {
            format!("{how}; last output: {}", shown.join(" ⏎ "))
        };
        let Some(slot) = self.slots.get_mut(instance) else {
            self.logger.event(
                "exited",
                Some(who),
                &format!("stopped: {how} after {}", human(uptime)),
                &fields,
            );
            return;
        };
        if slot.worker == Some(id) {
            slot.worker = None;
            slot.last_exit = Some(if w.stopping {
                how.clone()
            } else {
                reason.clone()
            });
            self.all_ready = false;
        }
        if w.incoming && !w.stopping {
            self.logger.event(
                "exited",
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
        if w.stopping || self.phase != Phase::Running || slot.retiring {
            self.logger.event(
                "exited",
                Some(who),
                &format!("stopped: {how} after {}", human(uptime)),
                &fields,
            );
            let respawn = slot.respawn && slot.worker.is_none() && self.phase == Phase::Running;
            if respawn {
                slot.respawn = false;
                self.start_worker(instance, false);
            }
            self.trim_slots();
            self.check_op();
            return;
        }
        let cause = if w.hung { "hung" } else { "crash" };
        *slot.reasons.entry(cause).or_default() += 1;
        self.after_exit(instance, who, uptime, &how, reason, &fields);
        self.check_op();
    }

    /// Decides whether a slot whose worker just died restarts or gives up.
    fn after_exit(
        &mut self,
        instance: usize,
        who: Who,
        uptime: Duration,
        how: &str,
        reason: String,
        fields: &[(&str, Value)],
    ) {
        let policy = self.plan.spec.policy.clone();
        let slot = &mut self.slots[instance];
        if !policy.autorestart {
            self.logger.event(
                "exited",
                Some(who),
                &format!(
                    "exited ({how}) after {} — not restarting (--no-autorestart)",
                    human(uptime)
                ),
                fields,
            );
            slot.errored = Some(reason);
            self.check_all_errored();
            return;
        }
        match slot.backoff.on_exit(uptime, &policy) {
            Verdict::Restart(delay) => {
                slot.restarts += 1;
                slot.restart_pending = true;
                self.logger.event(
                    "exited",
                    Some(who),
                    &format!(
                        "exited ({how}) after {} — restarting in {}",
                        human(uptime),
                        human(delay)
                    ),
                    fields,
                );
                self.logger.event(
                    "restarting",
                    Some(who),
                    &format!("restarting in {}", human(delay)),
                    &[("delay_ms", json!(delay.as_millis() as u64))],
                );
                self.after(delay, Event::RestartDue { instance });
            }
            Verdict::GiveUp => {
                let unstable = slot.backoff.unstable;
                self.logger.event(
                    "exited",
                    Some(who),
                    &format!("exited ({how}) after {}", human(uptime)),
                    fields,
                );
                self.logger.event(
                    "errored",
                    Some(who),
                    &format!(
                        "errored: {} restarts in a row each died before --min-uptime {}; giving up on this slot. Last exit: {reason}",
                        unstable - 1,
                        human(policy.min_uptime)
                    ),
                    &[("reason", json!(reason))],
                );
                slot.errored = Some(reason);
                self.check_all_errored();
                self.check_op();
            }
        }
    }

    fn check_all_errored(&mut self) {
        if self.phase == Phase::Running
            && self
                .slots
                .iter()
                .all(|s| s.errored.is_some() && s.incoming.is_none())
        {
            self.logger
                .event("errored", None, "every worker slot errored — exiting", &[]);
            self.stop_all(1);
        }
    }

    /// Takes a worker out of routing and out of every server; re-routes what it held.
    fn detach(&mut self, w: &mut Worker) {
        w.channel = None;
        for server in std::mem::take(&mut w.servers) {
            if let Some(s) = self.servers.get_mut(server) {
                s.workers.retain(|&x| x != w.id);
            }
        }
        for f in std::mem::take(&mut w.inflight) {
            let mut conn = f.conn;
            if conn.probe {
                continue;
            }
            conn.attempts += 1;
            self.route(f.server, conn);
        }
    }

    fn on_ipc_closed(&mut self, id: WorkerId, reason: Option<String>) {
        if let Some(reason) = reason {
            if let Some(w) = self.workers.get_mut(&id).filter(|w| !w.stopping && !w.hung) {
                w.channel = None;
                let who = w.who();
                self.logger.event(
                    "ipc_error",
                    Some(who),
                    &format!(
                        "IPC channel broken: {reason} — killing the worker; its slot restarts"
                    ),
                    &[],
                );
                signal_group(w.pid, rustix::process::Signal::TERM);
                let grace = self.plan.spec.policy.kill_timeout.min(TERM_GRACE);
                self.after(
                    grace,
                    Event::KillDue {
                        id,
                        signal: rustix::process::Signal::KILL,
                    },
                );
            }
        }
        // EOF: the worker is leaving (disconnect, crash or exit). Route around it now; its
        // exit decides what happens to the slot. Node workers exit when their channel
        // closes; one that does not is made to, so its slot does not sit idle.
        if self
            .workers
            .get(&id)
            .is_some_and(|w| !w.stopping && !w.hung)
        {
            let grace = self.plan.spec.policy.kill_timeout;
            self.after(
                grace,
                Event::KillDue {
                    id,
                    signal: rustix::process::Signal::TERM,
                },
            );
        }
        let Some(mut w) = self.workers.remove(&id) else {
            return;
        };
        self.detach(&mut w);
        self.workers.insert(id, w);
    }

    /// Slots whose current worker is ready and not stopping.
    fn ready_slots(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| {
                s.worker
                    .and_then(|id| self.workers.get(&id))
                    .is_some_and(|w| w.ready && !w.stopping)
            })
            .count()
    }

    fn mark_ready(&mut self, id: WorkerId, via: &str) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.ready || w.stopping {
            return;
        }
        w.ready = true;
        w.last_watchdog = std::time::Instant::now();
        let who = w.who();
        let servers = w.servers.clone();
        let promote = w.incoming.then_some(w.instance);
        let ms = w.started.elapsed().as_millis() as u64;
        self.logger.event(
            "ready",
            Some(who),
            &format!("ready ({via}) in {ms}ms"),
            &[("via", json!(via)), ("ms", json!(ms))],
        );
        if let Some(instance) = promote {
            self.promote(id, instance);
        }
        for s in servers {
            self.drain(s);
        }
        let ready = self.ready_slots();
        if !self.all_ready && ready == self.slots.len() {
            self.all_ready = true;
            self.tell_manager(&format!("READY=1\nSTATUS={ready} workers ready"));
            self.logger.event(
                "all_ready",
                None,
                &format!("all {ready} workers ready"),
                &[("ready", json!(ready))],
            );
        }
        self.check_op();
    }

    fn on_notify(&mut self, id: WorkerId, messages: Vec<Notify>, malformed: Vec<String>) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let who = w.who();
        for m in malformed {
            self.logger.event(
                "notify_error",
                Some(who),
                &format!("ignored a malformed notify message: {m}"),
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
                        w.last_watchdog = std::time::Instant::now();
                    }
                }
                Notify::Stopping => {
                    if let Some(w) = self.workers.get_mut(&id) {
                        w.leaving = true;
                    }
                }
                Notify::Errno(n) => {
                    self.logger.event(
                        "notify",
                        Some(who),
                        &format!("reports errno {n}"),
                        &[("errno", json!(n))],
                    );
                }
                _ => {}
            }
        }
    }

    fn on_ipc(&mut self, id: WorkerId, msg: Ipc) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        match msg {
            Ipc::HandleAck => {
                w.send(&self.tx, |c| c.on_ack());
            }
            Ipc::HandleNack => {
                w.send(&self.tx, |c| c.on_nack());
            }
            Ipc::Reply { ack, accepted } => {
                let Some(i) = w.inflight.iter().position(|f| f.seq == ack) else {
                    return;
                };
                let f = w.inflight.swap_remove(i);
                if accepted == Some(false) && !f.conn.probe {
                    let mut conn = f.conn;
                    conn.attempts += 1;
                    self.route_avoiding(f.server, conn, Some(id));
                }
                self.drain(f.server);
            }
            Ipc::WorkerHandle => {
                w.send(&self.tx, |c| c.line(r#"{"cmd":"NODE_HANDLE_ACK"}"#));
            }
            Ipc::SocketNotifyClose { key } => {
                let line = format!(
                    r#"{{"cmd":"NODE_SOCKET_ALL_CLOSED","key":{}}}"#,
                    herd_proto::node::quote(&key)
                );
                w.send(&self.tx, |c| c.line(&line));
            }
            Ipc::SocketGetCount { key } => {
                let line = format!(
                    r#"{{"cmd":"NODE_SOCKET_COUNT","key":{},"count":0}}"#,
                    herd_proto::node::quote(&key)
                );
                w.send(&self.tx, |c| c.line(&line));
            }
            Ipc::Online => {
                w.online = true;
                let who = w.who();
                self.logger.event("online", Some(who), "online", &[]);
            }
            Ipc::ExitedAfterDisconnect { seq } => {
                // The worker is leaving on its own (cluster.worker.disconnect()/kill()) and
                // waits for this ack before it goes. It gets no new connections; its exit
                // restarts the slot like any other, so the app keeps N workers.
                w.leaving = true;
                let fields = format!(r#""ack":{seq}"#);
                w.send(&self.tx, |c| c.cluster(&fields));
                let who = w.who();
                self.logger.event(
                    "disconnecting",
                    Some(who),
                    "is disconnecting on its own",
                    &[],
                );
            }
            Ipc::QueryServer(query) => self.query_server(id, *query),
            Ipc::BadQueryServer { seq, detail } => {
                let who = w.who();
                self.logger.event(
                    "listen_error",
                    Some(who),
                    &format!("cannot listen: herd cannot read this listen() request ({detail}); answering EINVAL"),
                    &[],
                );
                if let Some(seq) = seq {
                    let fields = format!(
                        r#""errno":{},"key":"herd:invalid:{seq}","ack":{seq},"data":null"#,
                        -libc::EINVAL
                    );
                    w.send(&self.tx, |c| c.cluster(&fields));
                }
            }
            Ipc::Listening => {
                if self.plan.ready == Ready::Listening {
                    self.mark_ready(id, "listening");
                }
            }
            Ipc::Close { key } => self.server_closed_by(id, &key),
            Ipc::User(text) => self.user_message(id, text),
            Ipc::Garbage(error) => {
                let who = w.who();
                self.logger.event(
                    "ipc_error",
                    Some(who),
                    &format!("sent something herd cannot read, ignored: {error}"),
                    &[],
                );
            }
        }
    }

    fn user_message(&mut self, id: WorkerId, text: String) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let who = w.who();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if value == json!("ready") && self.plan.ready == Ready::Message {
            self.mark_ready(id, "message");
            return;
        }
        if value.get("herd").and_then(Value::as_str) == Some("broadcast") {
            let data = value.get("data").cloned().unwrap_or(Value::Null);
            let line = data.to_string();
            let others: Vec<WorkerId> = self.workers.keys().copied().filter(|&o| o != id).collect();
            for other in &others {
                if let Some(o) = self.workers.get_mut(other) {
                    o.send(&self.tx, |c| c.line(&line));
                }
            }
            self.logger.event(
                "broadcast",
                Some(who),
                &format!("broadcast to {} workers: {line}", others.len()),
                &[("data", data)],
            );
            return;
        }
        let shown = if text.len() > 1000 {
            format!("{}…", &text[..text.floor_char_boundary(1000)])
        } else {
            text
        };
        self.logger.event(
            "message",
            Some(who),
            &format!("message: {shown}"),
            &[("data", value)],
        );
    }

    fn query_server(&mut self, id: WorkerId, query: herd_proto::node::QueryServer) {
        let key = query.key();
        let server = match self.servers.by_key(&key) {
            Some(s) => s,
            None => match servers::bind_for(&query, self.plan.balance, &self.plan.listeners) {
                Ok(bound) => {
                    let server = servers::new_server(&query, bound);
                    let display = server.display.clone();
                    let mode = server.mode;
                    let s = self.servers.insert(server);
                    self.logger.event(
                        "bound",
                        None,
                        &format!("listening on {display} ({mode})"),
                        &[
                            ("address", json!(display)),
                            ("balance", json!(mode.to_string())),
                        ],
                    );
                    if mode != Balance::Shared {
                        self.start_accepting(s);
                    }
                    s
                }
                Err((errno, problem)) => {
                    if let Some(w) = self.workers.get_mut(&id) {
                        let who = w.who();
                        self.logger.event(
                            "listen_error",
                            Some(who),
                            &format!("cannot listen: {problem}"),
                            &[("errno", json!(errno))],
                        );
                        let data = query.data.as_ref().map_or("null", |d| d.get());
                        let fields = format!(
                            r#""errno":{errno},"key":{},"ack":{},"data":{data}"#,
                            herd_proto::node::quote(&key),
                            query.seq
                        );
                        w.send(&self.tx, |c| c.cluster(&fields));
                    }
                    return;
                }
            },
        };
        let Some(s) = self.servers.get_mut(server) else {
            return;
        };
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if !s.workers.contains(&id) {
            s.workers.push(id);
        }
        if !w.servers.contains(&server) {
            w.servers.push(server);
        }
        let fields = s.reply_fields(query.seq);
        match s.mode {
            Balance::Shared => {
                let socket = Rc::clone(&s.socket);
                w.send(&self.tx, |c| c.cluster_with_fd(&fields, socket.as_fd()));
            }
            Balance::RoundRobin | Balance::Sticky => {
                w.send(&self.tx, |c| c.cluster(&fields));
            }
        }
        self.drain(server);
    }

    fn start_accepting(&mut self, server: ServerId) {
        let Some(s) = self.servers.get_mut(server) else {
            return;
        };
        let gate = Rc::new(AcceptGate::default());
        s.gate = Some(Rc::clone(&gate));
        s.accept_task = Some(tokio::task::spawn_local(balance::accept_loop(
            server,
            Rc::clone(&s.socket),
            gate,
            self.tx.clone(),
        )));
    }

    fn server_closed_by(&mut self, id: WorkerId, key: &str) {
        let Some(server) = self.servers.by_key(key) else {
            return;
        };
        let stopping = self.workers.get(&id).is_none_or(|w| w.stopping);
        if let Some(w) = self.workers.get_mut(&id) {
            w.servers.retain(|&s| s != server);
        }
        let Some(s) = self.servers.get_mut(server) else {
            return;
        };
        s.workers.retain(|&w| w != id);
        // The app closed this server on purpose (not a worker going away): once no worker
        // holds it, herd closes it too.
        if !stopping && s.workers.is_empty() && !s.from_cli {
            if let Some(s) = self.servers.remove(server) {
                self.logger.event(
                    "closed",
                    None,
                    &format!("closed {} (the app closed it)", s.display),
                    &[],
                );
            }
        }
    }

    /// Sends a connection to a worker, or queues it.
    fn route(&mut self, server: ServerId, conn: Pending) {
        self.route_avoiding(server, conn, None)
    }

    fn route_avoiding(&mut self, server: ServerId, conn: Pending, avoid: Option<WorkerId>) {
        let Some(s) = self.servers.get_mut(server) else {
            return;
        };
        let limit = s.workers.len().max(1) + 2;
        if usize::from(conn.attempts) > limit {
            return; // Refused everywhere: closing it is all that is left.
        }
        let workers = &self.workers;
        let pick = match s.mode {
            Balance::RoundRobin | Balance::Shared => {
                balance::next_free(&s.workers, &mut s.cursor, |id| {
                    Some(id) != avoid
                        && workers.get(&id).is_some_and(|w| {
                            w.routable() && w.unacked(server) < balance::MAX_UNACKED
                        })
                })
            }
            Balance::Sticky => s
                .workers
                .iter()
                .copied()
                .filter(|&id| Some(id) != avoid && workers.get(&id).is_some_and(Worker::routable))
                .max_by_key(|id| balance::sticky_score(conn.peer, workers[id].instance)),
        };
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
            self.route_avoiding(server, conn, Some(id));
            return;
        }
        let health = &self.plan.spec.health;
        if let Some(max) = health.max_requests {
            let limit = max + crate::health::jitter(id, health.max_requests_jitter);
            if w.connections >= limit && !w.replacing {
                let why = format!("{} connections >= --max-requests {limit}", w.connections);
                self.queue_replacement(id, "requests", why);
            }
        }
    }

    /// Hands queued connections to workers that can take them.
    fn drain(&mut self, server: ServerId) {
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
            let any_free = s.workers.iter().any(|id| {
                workers.get(id).is_some_and(|w| {
                    w.routable()
                        && (s.mode == Balance::Sticky || w.unacked(server) < balance::MAX_UNACKED)
                })
            });
            if !any_free {
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

/// Signals a worker's whole process group. Errors (it is already gone) are ignored.
fn signal_group(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

/// `code 1`, `signal 9, SIGKILL`.
pub fn describe_status(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("code {code}"),
        (None, Some(sig)) => format!("signal {sig}, {}", signal_name(sig)),
        _ => "unknown status".into(),
    }
}

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        _ => "signal",
    }
}

/// `150ms`, `3.2s`, `2m5s`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}m{}s", ms / 60_000, ms % 60_000 / 1000)
    }
}
