//! One worker process: how it is started (environment, fds, IPC, notify socket) and the
//! tasks that watch it. The supervisor owns the [`Worker`] records; the tasks only report.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::rc::Rc;

use herd_proto::event::EventName;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

use crate::logs::{self, Logger, Stream, Tail, Who};
use crate::node::channel::{self, Channel, Out, SendError, Tally};
use crate::os::{Os, Spawned};
use crate::plan::Plan;
use crate::spawn::{Leader, SpawnRequest, FIRST_FD};
use crate::spec::WorkerKind;
use crate::vocab::{Event, ServerId, WorkerId};

use super::state::{Replacement, Role, WorkerState};

/// A connection handed to a worker that has not said whether it took it.
///
/// The fd is shared with the queued `newconn` message until that message is answered, so
/// the descriptor stays this connection's (its number cannot be reused) for as long as herd
/// may still send it. Only a *delivered* hand-off (the worker ACKed its fd) may be answered
/// with `accepted`; until then the channel may still send it, so re-routing it would hand
/// one connection to two workers.
#[derive(Debug)]
pub struct InFlight {
    pub seq: u64,
    pub server: ServerId,
    pub fd: Rc<OwnedFd>,
    pub peer: Option<std::net::IpAddr>,
    pub attempts: u8,
    pub probe: bool,
    /// When it was handed over (hang detection).
    pub at: Instant,
    /// The worker acknowledged the fd (`NODE_HANDLE_ACK`).
    pub delivered: bool,
}

impl InFlight {
    /// The connection back, to route elsewhere; `None` when a queued message still holds
    /// it (it then goes where that message goes, and nowhere else).
    pub fn into_pending(self) -> Option<crate::balance::Pending> {
        let fd = Rc::try_unwrap(self.fd).ok()?;
        Some(crate::balance::Pending {
            fd,
            peer: self.peer,
            attempts: self.attempts,
            probe: self.probe,
        })
    }
}

pub struct Worker {
    pub id: WorkerId,
    pub instance: usize,
    pub pid: u32,
    /// Signals go through it: never to a pid or group herd has reaped.
    pub leader: Leader,
    pub started: Instant,
    /// Where it is in its life; changed only by [`Worker::set_state`].
    state: WorkerState,
    /// Current, or (reload) an incoming replacement not yet its slot's current worker.
    pub role: Role,
    /// Connections herd handed to it.
    pub connections: u64,
    /// A task waits for its full IPC socket to drain (see [`Worker::send`]). Beside the
    /// lifecycle: a flush can be awaited in any state that has a channel.
    pub write_waiting: bool,
    /// The last CPU reading, for `herd status`.
    pub cpu: Option<crate::procfs::CpuSample>,
    /// A graceful replacement for a health reason: beside the lifecycle (the worker keeps
    /// serving, `Ready`, until its successor is).
    pub replacement: Replacement,
    /// The last `WATCHDOG=1` (or when it became ready).
    pub last_watchdog: Instant,
    /// An event-loop ping in flight: when it was sent and the pong count then.
    pub ping: Option<(Instant, u64)>,
    pub probe_due: Option<Instant>,
    /// A health probe is in flight (beside the lifecycle, like `write_waiting`).
    pub probing: bool,
    /// Stopping: herd has sent it SIGTERM (once its disconnect finished, or at half
    /// `--kill-timeout`), so the other of the two does not send a second one.
    pub termed: bool,
    /// Not ready by `--listen-timeout` (and not since): `herd restart` and `herd scale` stop
    /// waiting for it and answer with an error.
    pub late: bool,
    pub probe_failures: u32,
    /// The last probe's outcome, for `herd status`.
    pub health: Option<String>,
    /// Socket activation with --health-check: its private `health` listener's port.
    pub health_port: Option<u16>,
    /// Node: the IPC channel, until it closes.
    pub channel: Option<Channel>,
    pub inflight: Vec<InFlight>,
    /// User messages dropped because it did not read them (counted, logged now and then).
    pub dropped: Tally,
    /// Protocol errors it made (answers to nothing, oversized echoes), ignored.
    pub protocol_errors: Tally,
    /// Hand-offs it NACKed past the limit, given to another worker or closed.
    pub given_up: Tally,
    logger: Logger,
    /// Servers it holds (Node).
    pub servers: Vec<ServerId>,
    pub tail: Tail,
    pub status: Option<String>,
    /// `status` holds herd's hint that it listens on its own port (see `refuse`).
    pub own_port_hint: bool,
    notify_path: Option<PathBuf>,
    notify_task: Option<tokio::task::JoinHandle<()>>,
}

impl Worker {
    pub fn who(&self) -> Who {
        Who {
            instance: self.instance,
            worker_id: self.id,
            pid: self.pid,
        }
    }

    /// Can take a new connection from herd (round-robin, sticky).
    pub fn routable(&self) -> bool {
        self.state.takes_connections() && self.channel.is_some()
    }

    /// Said it is unready but can still answer (alive, its channel open): where herd
    /// hands connections when no worker is ready (see `Supervisor::only_unready_left`).
    pub fn routable_unready(&self) -> bool {
        self.state.unready_reason().is_some() && self.channel.is_some()
    }

    /// Can take a connection on `server` now: routable (or, as the `fallback` when no
    /// worker is ready, unready) with no hand-off there unanswered.
    pub fn takes(&self, server: ServerId, fallback: bool) -> bool {
        (self.routable() || fallback && self.routable_unready()) && self.free_for(server)
    }

    pub fn state(&self) -> &WorkerState {
        &self.state
    }

    /// Moves it to `next` and records the change (a `state` event in JSON logs). A
    /// transition the machine does not have is a bug in herd: it is refused and logged, and
    /// fails debug builds (the tests).
    pub fn set_state(&mut self, next: WorkerState) {
        let from = self.state.name();
        let to = next.name();
        let detail = match &next {
            WorkerState::Draining { reason, .. } => Some(reason.as_str().to_string()),
            WorkerState::Exited { status } => Some(status.clone()),
            _ => None,
        };
        if let Err(invalid) = self.state.advance(next) {
            self.logger.event(
                EventName::Error,
                Some(self.who()),
                &format!(
                    "herd bug: invalid worker state change {} → {}, ignored",
                    invalid.from, invalid.to
                ),
                &[],
            );
            debug_assert!(false, "invalid worker state change {invalid:?}");
            return;
        }
        let mut fields = vec![(
            "role",
            serde_json::json!(match self.role {
                Role::Current => "current",
                Role::Incoming => "incoming",
            }),
        )];
        if let Some(detail) = detail {
            fields.push(("detail", serde_json::json!(detail)));
        }
        self.logger.transition(Some(self.who()), from, to, &fields);
    }

    /// Can take one more hand-off on `server`: fewer than [`crate::balance::MAX_UNACKED`]
    /// unanswered there.
    pub fn free_for(&self, server: ServerId) -> bool {
        self.inflight.iter().filter(|f| f.server == server).count() < crate::balance::MAX_UNACKED
    }

    /// Queues a message and arranges a later flush if the socket is full. Returns false
    /// when the message was not queued: the channel is broken (the worker is going away), the
    /// worker is stuck (it is reported, and replaced), or a user message was dropped (counted
    /// and logged now and then).
    pub fn send(
        &mut self,
        tx: &UnboundedSender<Event>,
        f: impl FnOnce(&mut Channel) -> Result<channel::Flush, SendError>,
    ) -> bool {
        let Some(chan) = self.channel.as_mut() else {
            return false;
        };
        match f(chan) {
            Ok(channel::Flush::Done) => true,
            Ok(channel::Flush::Blocked) if self.write_waiting => true,
            Ok(channel::Flush::Blocked) => {
                // One waiter per worker: later messages join the queue it will flush.
                self.write_waiting = true;
                let sock = Rc::clone(chan.socket());
                let tx = tx.clone();
                let id = self.id;
                tokio::task::spawn_local(async move {
                    if sock.writable().await.is_ok() {
                        let _ = tx.send(Event::IpcWritable { id });
                    }
                });
                true
            }
            Err(SendError::Dropped { bytes, why }) => {
                if let Some(n) = self.dropped.note() {
                    let total = self.dropped.total;
                    self.logger.event(
                        EventName::IpcDropped,
                        Some(self.who()),
                        &format!(
                            "dropped {n} message(s) for it ({bytes} bytes, {why}); {total} so far"
                        ),
                        &[
                            ("dropped", serde_json::json!(total)),
                            ("bytes", serde_json::json!(bytes)),
                        ],
                    );
                }
                false
            }
            Err(SendError::Stuck(why)) => {
                // Its queue is dropped with the channel; the supervisor kills and replaces it.
                self.channel = None;
                let _ = tx.send(Event::IpcClosed {
                    id: self.id,
                    reason: Some(why),
                });
                false
            }
            Err(SendError::Broken) => {
                self.channel = None;
                false
            }
        }
    }

    /// Logs a protocol error the worker made (rate-limited); the message is ignored.
    pub fn protocol_error(&mut self, what: &str) {
        if let Some(n) = self.protocol_errors.note() {
            let total = self.protocol_errors.total;
            self.logger.event(
                EventName::IpcError,
                Some(self.who()),
                &format!("{what} — ignored ({n} since the last such line, {total} in all)"),
                &[("errors", serde_json::json!(total))],
            );
        }
    }

    /// Hands a connection over (`newconn`). When the channel cannot take it, the connection
    /// comes back (`None` only if something else still holds its fd, which nothing does).
    pub fn hand_off(
        &mut self,
        tx: &UnboundedSender<Event>,
        server: ServerId,
        key_json: &Rc<str>,
        conn: crate::balance::Pending,
    ) -> Result<(), Option<crate::balance::Pending>> {
        let Some(chan) = self.channel.as_mut() else {
            return Err(Some(conn));
        };
        let seq = chan.next_seq();
        let counted = !conn.probe;
        let fd = Rc::new(conn.fd);
        self.inflight.push(InFlight {
            seq,
            server,
            fd: Rc::clone(&fd),
            peer: conn.peer,
            attempts: conn.attempts,
            probe: conn.probe,
            at: Instant::now(),
            delivered: false,
        });
        let key_json = Rc::clone(key_json);
        if self.send(tx, |c| c.push(Out::NewConn { key_json, seq, fd })) {
            if counted {
                self.connections += 1;
            }
            Ok(())
        } else {
            let f = self.inflight.pop().expect("pushed above");
            // The refused message was dropped with its fd clone, so this is the only owner.
            Err(f.into_pending())
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(task) = self.notify_task.take() {
            task.abort();
        }
        if let Some(path) = &self.notify_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Everything constant across an app's workers.
pub struct Launcher {
    pub plan: Rc<Plan>,
    pub logger: Logger,
    pub tx: UnboundedSender<Event>,
    /// Where workers are started (the real OS, or a test's fake).
    os: Rc<dyn Os>,
    /// herd's environment without the variables that must not leak, plus `--env`.
    base_env: Vec<(OsString, OsString)>,
    /// Private directory for notify sockets (see rundir.rs), and herd's fd of it.
    run_dir: PathBuf,
    run_dir_fd: Result<OwnedFd, String>,
    /// The command line, with herd's keep-alive drain preloaded for Node workers.
    argv: Vec<OsString>,
    /// Socket activation: the listening sockets (listener index, slot or `usize::MAX` for
    /// the shared one) already made blocking, once, before the first worker got them.
    made_blocking: std::cell::RefCell<std::collections::HashSet<(usize, usize)>>,
}

/// herd's keep-alive drain for Node workers (see the file's header).
const DRAIN_JS: &str = include_str!("../node/drain.js");

/// Variables herd sets for each worker, or that would confuse it if inherited from herd's
/// own parent (a herd under systemd must not pass its LISTEN_FDS or NOTIFY_SOCKET on).
const NOT_INHERITED: [&str; 14] = [
    "NODE_UNIQUE_ID",
    "NODE_CHANNEL_FD",
    "NODE_CHANNEL_SERIALIZATION_MODE",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "HERD_APP",
    "HERD_WORKER_ID",
    "HERD_INSTANCE",
    "NODE_APP_INSTANCE",
    "HERD_CONTROL",
];

impl Launcher {
    pub fn new(
        plan: Rc<Plan>,
        logger: Logger,
        tx: UnboundedSender<Event>,
        run_dir: PathBuf,
        os: Rc<dyn Os>,
    ) -> Self {
        let run_dir_fd = crate::rundir::open(&run_dir)
            .and_then(|fd| {
                if let Some(user) = &plan.user {
                    crate::rundir::share_with_group(&fd, user.gid)?;
                }
                Ok(fd)
            })
            .map_err(|e| format!("run directory {}: {e}", run_dir.display()));
        let (base_env, argv) = command_for(&plan, &logger, &run_dir);
        Launcher {
            plan,
            logger,
            tx,
            os,
            base_env,
            run_dir,
            run_dir_fd,
            argv,
            made_blocking: Default::default(),
        }
    }

    /// Starts worker `id` in slot `instance`.
    pub fn launch(&self, id: WorkerId, instance: usize) -> io::Result<Worker> {
        let plan = &self.plan;
        let mut env = self.worker_env(id, instance);
        let (notify, notify_path) = self.notify_socket(id)?;
        env.push(("NOTIFY_SOCKET".into(), notify_path.clone().into_os_string()));
        let given = self.given_fds(id, instance, &mut env)?;
        let fds = self.fds_of(&given);
        let Spawned {
            pid,
            leader,
            stdout,
            stderr,
            exit,
        } = self.os.launch(&SpawnRequest {
            program: &plan.program,
            argv: &self.argv,
            env: &env,
            listen_pid: given.listen_pid,
            fds: &fds,
            cwd: plan.cwd.as_deref(),
            uid: plan.user.as_ref().map(|u| u.uid),
            gid: plan.user.as_ref().map(|u| u.gid),
            groups: plan.user.as_ref().map_or(&[][..], |u| u.groups.as_slice()),
        })?;
        drop(fds);
        let who = Who {
            instance,
            worker_id: id,
            pid,
        };
        let tail = self.watch(who, exit, stdout, stderr)?;
        let notify = tokio::net::UnixDatagram::from_std(notify)?;
        let notify_task = tokio::task::spawn_local(notify_loop(notify, id, pid, self.tx.clone()));
        let channel = match given.ipc {
            Some((ours, theirs)) => {
                drop(theirs);
                ours.set_nonblocking(true)?;
                let sock = Rc::new(tokio::net::UnixStream::from_std(ours)?);
                tokio::task::spawn_local(channel::read_loop(Rc::clone(&sock), id, self.tx.clone()));
                Some(Channel::new(sock))
            }
            None => None,
        };

        Ok(Worker {
            id,
            instance,
            pid,
            leader,
            started: Instant::now(),
            state: WorkerState::Starting {
                since: Instant::now(),
            },
            role: Role::Current,
            connections: 0,
            write_waiting: false,
            cpu: None,
            replacement: Replacement::Idle,
            last_watchdog: Instant::now(),
            ping: None,
            probe_due: None,
            probing: false,
            termed: false,
            late: false,
            probe_failures: 0,
            health: None,
            health_port: given.health_port,
            channel,
            inflight: Vec::new(),
            dropped: Tally::default(),
            protocol_errors: Tally::default(),
            given_up: Tally::default(),
            logger: self.logger.clone(),
            servers: Vec::new(),
            tail,
            status: None,
            own_port_hint: false,
            notify_path: Some(notify_path),
            notify_task: Some(notify_task),
        })
    }

    /// herd's environment plus what tells a worker who it is (`HERD_*`, `PORT`).
    fn worker_env(&self, id: WorkerId, instance: usize) -> Vec<(OsString, OsString)> {
        let plan = &self.plan;
        let mut env = self.base_env.clone();
        let mut set = |k: &str, v: String| env.push((k.into(), v.into()));
        set("HERD_APP", plan.spec.name.clone());
        set("HERD_WORKER_ID", id.to_string());
        set("HERD_INSTANCE", instance.to_string());
        set("NODE_APP_INSTANCE", instance.to_string());
        if let Some(port) = plan.first_port() {
            set("PORT", port.to_string());
        }
        env
    }

    /// The worker's own notify socket (`NOTIFY_SOCKET`): 0600 and the worker's; the directory
    /// stays herd's (rundir.rs).
    fn notify_socket(
        &self,
        id: WorkerId,
    ) -> io::Result<(std::os::unix::net::UnixDatagram, PathBuf)> {
        let dir = self
            .run_dir_fd
            .as_ref()
            .map_err(|e| io::Error::other(e.clone()))?;
        let name = format!("w{id}.notify");
        let notify = crate::rundir::bind_notify(
            dir,
            &self.run_dir,
            &name,
            self.plan.user.as_ref().map(|u| (u.uid, u.gid)),
        )?;
        notify.set_nonblocking(true)?;
        Ok((notify, self.run_dir.join(&name)))
    }

    /// The fds worker `id` gets at 3.. and the variables that describe them: the listeners
    /// (and a private `health` one) for socket activation, the IPC channel for Node.
    fn given_fds(
        &self,
        id: WorkerId,
        instance: usize,
        env: &mut Vec<(OsString, OsString)>,
    ) -> io::Result<GivenFds> {
        let plan = &self.plan;
        let mut set = |k: &str, v: String| env.push((k.into(), v.into()));
        let mut given = GivenFds {
            listen_pid: false,
            ipc: None,
            slot_sockets: Vec::new(),
            health: None,
            health_port: None,
        };
        match plan.kind {
            WorkerKind::SocketActivation => {
                // `--balance hash|sticky`: this slot's socket of each TCP listener.
                given.slot_sockets = plan
                    .listeners
                    .iter()
                    .map(|l| {
                        l.group
                            .as_ref()
                            .map(|g| super::kernel::slot_socket(g, instance))
                            .transpose()
                    })
                    .collect::<io::Result<_>>()?;
                // Blocking, as systemd passes them: a plain `accept()` loop waits instead of
                // dying on EAGAIN. The flag belongs to the socket every worker of the app
                // shares, so it is set once, before the first worker gets the socket, and
                // never again: an async server makes it non-blocking for itself and every
                // other worker (as under systemd), and setting it back under a running one
                // would let its accept() block its event loop. herd accepts from a
                // socket-activation listener only on a helper thread that does not depend on
                // the flag (`balance::AcceptThread`).
                for (i, l) in plan.listeners.iter().enumerate() {
                    let (key, fd) = match given.slot_sockets.get(i) {
                        Some(Some(own)) => ((i, instance), own.as_fd()),
                        _ => ((i, usize::MAX), l.socket.as_fd()),
                    };
                    if self.made_blocking.borrow_mut().insert(key) {
                        set_blocking(fd)?;
                    }
                }
                let mut names: Vec<&str> = plan.listeners.iter().map(|l| l.name.as_str()).collect();
                if plan.spec.health.check.is_some() {
                    let socket = crate::plan::bind_tcp(
                        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                        true,
                    )?;
                    set_blocking(socket.as_fd())?;
                    given.health_port = socket.local_addr()?.as_socket().map(|a| a.port());
                    given.health = Some(socket.into());
                    names.push("health");
                }
                if let Some(watchdog) = plan.spec.health.watchdog {
                    set("WATCHDOG_USEC", watchdog.as_micros().to_string());
                }
                let count = names.len();
                given.listen_pid = count > 0;
                if given.listen_pid {
                    set("LISTEN_FDS", count.to_string());
                    set("LISTEN_FDNAMES", names.join(":"));
                }
            }
            WorkerKind::Node => {
                set("NODE_UNIQUE_ID", id.to_string());
                set("NODE_CHANNEL_FD", FIRST_FD.to_string());
                set("NODE_CHANNEL_SERIALIZATION_MODE", "json".into());
                given.ipc = Some(std::os::unix::net::UnixStream::pair()?);
            }
        }
        Ok(given)
    }

    /// Starts the tasks that watch a spawned worker: its exit (the only reaper from here on,
    /// spawn::wait_exit) and its output pumps, which keep its last lines in the returned tail.
    fn watch(
        &self,
        who: Who,
        exit: crate::os::Exit,
        stdout: Option<std::process::ChildStdout>,
        stderr: Option<std::process::ChildStderr>,
    ) -> io::Result<Tail> {
        let id = who.worker_id;
        let tx = self.tx.clone();
        tokio::task::spawn_local(async move {
            let status = exit.await;
            let _ = tx.send(Event::Exited { id, status });
        });
        let tail: Tail = Default::default();
        if let Some(out) = stdout {
            let out = tokio::process::ChildStdout::from_std(out)?;
            let pump = logs::pump(
                out,
                self.logger.clone(),
                who,
                Stream::Stdout,
                Rc::clone(&tail),
            );
            tokio::task::spawn_local(pump);
        }
        if let Some(err) = stderr {
            let err = tokio::process::ChildStderr::from_std(err)?;
            let pump = logs::pump(
                err,
                self.logger.clone(),
                who,
                Stream::Stderr,
                Rc::clone(&tail),
            );
            tokio::task::spawn_local(pump);
        }
        Ok(tail)
    }
}

/// What a worker inherits besides stdio, owned until it is spawned.
struct GivenFds {
    /// Socket activation with at least one fd: set `LISTEN_PID`.
    listen_pid: bool,
    /// Node: herd's end and the worker's end of the IPC channel.
    ipc: Option<(
        std::os::unix::net::UnixStream,
        std::os::unix::net::UnixStream,
    )>,
    /// Socket activation, `--balance hash|sticky`: the slot's own socket of each listener
    /// (None: the listener's one shared socket).
    slot_sockets: Vec<Option<Rc<OwnedFd>>>,
    /// Socket activation with --health-check: the worker's private `health` listener.
    health: Option<OwnedFd>,
    health_port: Option<u16>,
}

impl Launcher {
    /// The plan's listeners (with hash and sticky, the slot's own socket of each); `given`
    /// holds the rest.
    fn fds_of<'a>(&'a self, given: &'a GivenFds) -> Vec<BorrowedFd<'a>> {
        match &given.ipc {
            Some((_, theirs)) => vec![theirs.as_fd()],
            None => self
                .plan
                .listeners
                .iter()
                .enumerate()
                .map(|(i, l)| match given.slot_sockets.get(i) {
                    Some(Some(own)) => own.as_fd(),
                    _ => l.socket.as_fd(),
                })
                .chain(given.health.as_ref().map(|h| h.as_fd()))
                .collect(),
        }
    }
}

/// Clears `O_NONBLOCK` on a listening socket handed to a socket-activation worker.
fn set_blocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    if flags.contains(rustix::fs::OFlags::NONBLOCK) {
        rustix::fs::fcntl_setfl(fd, flags - rustix::fs::OFlags::NONBLOCK)?;
    }
    Ok(())
}

/// Reads a worker's notify datagrams (`READY=1`, `STATUS=…`) until the socket is dropped.
///
/// Only the worker may speak for itself: the socket has `SO_PASSCRED`, and a datagram counts
/// only if the kernel says its sender is in the worker's process group (the worker, or a
/// child it did not move out of the group). Anything else — another local process that
/// found the socket, a datagram without credentials — is dropped; the first and then every
/// power-of-two-th is reported, so a flood cannot flood the log.
async fn notify_loop(
    sock: tokio::net::UnixDatagram,
    id: WorkerId,
    leader: u32,
    tx: UnboundedSender<Event>,
) {
    let mut buf = vec![0u8; herd_proto::notify::MAX_DATAGRAM + 1];
    let mut refused: u64 = 0;
    loop {
        let got = sock
            .async_io(tokio::io::Interest::READABLE, || {
                recv_with_sender(sock.as_fd(), &mut buf)
            })
            .await;
        let (n, sender) = match got {
            Ok(got) => got,
            Err(_) => return,
        };
        if !in_group(sender, leader) {
            refused += 1;
            if refused.is_power_of_two() {
                let who = match sender {
                    Some(pid) => format!("pid {pid}"),
                    None => "a process herd cannot identify".into(),
                };
                let event = Event::Notify {
                    id,
                    messages: Vec::new(),
                    malformed: vec![format!(
                        "a datagram from {who}, which is not in the worker's process group \
                         ({refused} refused so far)"
                    )],
                };
                if tx.send(event).is_err() {
                    return;
                }
            }
            continue;
        }
        let event = match herd_proto::notify::parse(&buf[..n]) {
            Ok(parsed) => Event::Notify {
                id,
                messages: parsed.messages,
                malformed: parsed.malformed.iter().map(|m| m.to_string()).collect(),
            },
            Err(e) => Event::Notify {
                id,
                messages: Vec::new(),
                malformed: vec![e.to_string()],
            },
        };
        if tx.send(event).is_err() {
            return;
        }
    }
}

/// One datagram and the pid the kernel vouches for (`SCM_CREDENTIALS`). File descriptors
/// sent along are closed: the control buffer holds credentials only.
fn recv_with_sender(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<u32>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        fd,
        &mut [io::IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut sender = None;
    for m in control.drain() {
        match m {
            RecvAncillaryMessage::ScmCredentials(cred) => {
                sender = Some(cred.pid.as_raw_nonzero().get() as u32);
            }
            RecvAncillaryMessage::ScmRights(fds) => drop(fds.collect::<Vec<_>>()),
            _ => {}
        }
    }
    Ok((msg.bytes, sender))
}

/// Whether `sender` is the worker `leader` or in its process group.
fn in_group(sender: Option<u32>, leader: u32) -> bool {
    let Some(sender) = sender.filter(|&p| p != 0) else {
        return false;
    };
    if leader == 0 {
        return false;
    }
    if sender == leader {
        return true;
    }
    match rustix::process::Pid::from_raw(sender as i32) {
        Some(pid) => rustix::process::getpgid(Some(pid))
            .is_ok_and(|group| group.as_raw_nonzero().get() as u32 == leader),
        None => false,
    }
}

/// herd's environment for `plan`'s workers and their command line (with the keep-alive
/// drain preloaded for Node workers).
fn command_for(
    plan: &Plan,
    logger: &Logger,
    run_dir: &std::path::Path,
) -> (Vec<(OsString, OsString)>, Vec<OsString>) {
    let mut base_env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !NOT_INHERITED.iter().any(|n| k == n))
        .filter(|(k, _)| !(k == "PORT" && plan.first_port().is_some()))
        .collect();
    if let Some(user) = &plan.user {
        for (key, value) in [("USER", &user.name), ("LOGNAME", &user.name)] {
            base_env.retain(|(k, _)| k != key);
            base_env.push((key.into(), value.into()));
        }
        base_env.retain(|(k, _)| k != "HOME");
        base_env.push(("HOME".into(), user.home.clone().into()));
    }
    for (key, value) in &plan.spec.env {
        base_env.retain(|(k, _)| k != key.as_str());
        base_env.push((key.into(), value.into()));
    }
    let mut argv = plan.argv.clone();
    if plan.kind == WorkerKind::Node && plan.spec.keepalive_drain {
        let path = run_dir.join("herd-drain.js");
        match std::fs::write(&path, DRAIN_JS) {
            Ok(()) => {
                argv.splice(1..1, [OsString::from("--require"), path.into_os_string()]);
                let grace =
                    (plan.spec.policy.kill_timeout / 2).min(std::time::Duration::from_secs(1));
                base_env.push(("HERD_DRAIN_MS".into(), grace.as_millis().to_string().into()));
            }
            Err(e) => logger.event(
                EventName::Warning,
                None,
                &format!("keep-alive drain not loaded: {e}"),
                &[],
            ),
        }
    }
    (base_env, argv)
}

impl Launcher {
    /// Workers started from now on run `plan` (a reload onto a new spec); the sockets and
    /// the run directory stay.
    pub fn set_plan(&mut self, plan: Rc<Plan>) {
        let (base_env, argv) = command_for(&plan, &self.logger, &self.run_dir);
        self.base_env = base_env;
        self.argv = argv;
        self.plan = plan;
    }
}
