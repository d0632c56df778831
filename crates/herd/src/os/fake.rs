//! A recording fake of [`Os`] for unit tests, shaped after tokio's mock `Kill` and
//! watchexec's `TestChild`: every call is recorded with the (paused) time it came, and its
//! "workers" are records the test drives.
//!
//! A fake worker is a socket-activation worker (the simplest kind: no IPC protocol to speak).
//! The test makes it
//! - exit ([`FakeOs::exit`]): its exit future resolves, so the supervisor hears
//!   `Event::Exited` through the same task as for a real process;
//! - ready or alive ([`FakeOs::ready`], [`FakeOs::watchdog`]): `READY=1` / `WATCHDOG=1`
//!   arrive as the `Event::Notify` the worker's notify socket would produce;
//! - hang or drain ([`FakeOs::ignore_signals`]): it ignores every signal but SIGKILL;
//! - grow ([`FakeOs::set_rss`]): what /proc would report for its memory.
//!
//! Unless told to ignore them, a fake worker dies of any signal it is sent, as a process
//! without handlers does. Once it has exited its [`Leader`] is reaped, and the fake, like
//! the real OS, delivers nothing more to it.

use std::cell::RefCell;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::rc::Rc;

use herd_proto::notify::Message as Notify;
use rustix::process::Signal;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Os, Spawned};
use crate::spawn::{Leader, SpawnRequest};
use crate::supervisor::{Event, WorkerId};

/// One worker started.
#[derive(Debug, Clone)]
pub struct Spawn {
    /// From the worker's environment (`HERD_WORKER_ID`, `HERD_INSTANCE`), as a real worker
    /// would learn them.
    pub id: WorkerId,
    pub instance: usize,
    pub pid: u32,
    pub at: Instant,
    pub env: Vec<(String, String)>,
}

/// One signal asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signalled {
    pub pid: u32,
    /// To the process group (every signal herd sends is).
    pub group: bool,
    pub signal: Signal,
    /// False when the leader was already reaped: nothing went out.
    pub sent: bool,
    pub at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    Rss,
    Cpu,
}

/// Every call, in order.
#[derive(Debug, Clone)]
pub enum Call {
    Spawn(Spawn),
    Signal(Signalled),
    Read {
        pid: u32,
        what: Reading,
        at: Instant,
    },
}

struct FakeWorker {
    id: WorkerId,
    pid: u32,
    exit: Option<oneshot::Sender<ExitStatus>>,
    exited_at: Option<Instant>,
    ignores_signals: bool,
    rss: Option<u64>,
}

#[derive(Default)]
struct Inner {
    tx: Option<UnboundedSender<Event>>,
    next_pid: u32,
    workers: Vec<FakeWorker>,
    calls: Vec<Call>,
    fail_next: Option<io::ErrorKind>,
}

#[derive(Default)]
pub struct FakeOs {
    inner: RefCell<Inner>,
}

impl FakeOs {
    pub fn new() -> Rc<Self> {
        Rc::new(FakeOs::default())
    }

    /// Where the workers' notify messages go: the supervisor's event channel.
    pub fn attach(&self, tx: UnboundedSender<Event>) {
        self.inner.borrow_mut().tx = Some(tx);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.inner.borrow().calls.clone()
    }

    pub fn spawns(&self) -> Vec<Spawn> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Spawn(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    pub fn spawned(&self, id: WorkerId) -> Spawn {
        self.spawns()
            .into_iter()
            .find(|s| s.id == id)
            .unwrap_or_else(|| panic!("worker {id} was never spawned"))
    }

    /// Signals sent (or attempted) to worker `id`.
    pub fn signals(&self, id: WorkerId) -> Vec<Signalled> {
        let pid = self.spawned(id).pid;
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Signal(s) if s.pid == pid => Some(s),
                _ => None,
            })
            .collect()
    }

    /// The signals that went out to worker `id`.
    pub fn sent(&self, id: WorkerId) -> Vec<Signal> {
        self.signals(id)
            .into_iter()
            .filter(|s| s.sent)
            .map(|s| s.signal)
            .collect()
    }

    pub fn reads(&self, pid: u32) -> Vec<(Reading, Instant)> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Read { pid: p, what, at } if p == pid => Some((what, at)),
                _ => None,
            })
            .collect()
    }

    /// The newest worker started in `instance`.
    pub fn newest(&self, instance: usize) -> WorkerId {
        self.spawns()
            .into_iter()
            .rev()
            .find(|s| s.instance == instance)
            .map(|s| s.id)
            .unwrap_or_else(|| panic!("no worker was started in instance {instance}"))
    }

    pub fn running(&self, id: WorkerId) -> bool {
        self.with(id, |w| w.exited_at.is_none())
    }

    pub fn exited_at(&self, id: WorkerId) -> Option<Instant> {
        self.with(id, |w| w.exited_at)
    }

    /// The worker exits with `code`.
    pub fn exit(&self, id: WorkerId, code: i32) {
        self.with(id, |w| w.die(ExitStatus::from_raw((code & 0xff) << 8)));
    }

    /// The worker says `READY=1`.
    pub fn ready(&self, id: WorkerId) {
        self.notify(id, Notify::Ready);
    }

    /// The worker says `WATCHDOG=1`.
    pub fn watchdog(&self, id: WorkerId) {
        self.notify(id, Notify::Watchdog);
    }

    /// From now on the worker ignores every signal but SIGKILL (hung, or busy draining).
    pub fn ignore_signals(&self, id: WorkerId) {
        self.with(id, |w| w.ignores_signals = true);
    }

    /// What /proc reports as the worker's resident memory.
    pub fn set_rss(&self, id: WorkerId, bytes: u64) {
        self.with(id, |w| w.rss = Some(bytes));
    }

    /// The next launch fails with `kind`.
    pub fn fail_next_spawn(&self, kind: io::ErrorKind) {
        self.inner.borrow_mut().fail_next = Some(kind);
    }

    fn notify(&self, id: WorkerId, message: Notify) {
        assert!(self.running(id), "worker {id} has exited; it cannot speak");
        let inner = self.inner.borrow();
        let tx = inner.tx.as_ref().expect("FakeOs::attach was not called");
        let _ = tx.send(Event::Notify {
            id,
            messages: vec![message],
            malformed: Vec::new(),
        });
    }

    fn with<T>(&self, id: WorkerId, f: impl FnOnce(&mut FakeWorker) -> T) -> T {
        let mut inner = self.inner.borrow_mut();
        let w = inner
            .workers
            .iter_mut()
            .find(|w| w.id == id)
            .unwrap_or_else(|| panic!("worker {id} was never spawned"));
        f(w)
    }
}

impl FakeWorker {
    fn die(&mut self, status: ExitStatus) {
        if let Some(exit) = self.exit.take() {
            self.exited_at = Some(Instant::now());
            let _ = exit.send(status);
        }
    }
}

fn env_value(req: &SpawnRequest<'_>, key: &str) -> Option<String> {
    req.env
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.to_string_lossy().into_owned())
}

impl Os for FakeOs {
    fn launch(&self, req: &SpawnRequest<'_>) -> io::Result<Spawned> {
        let mut inner = self.inner.borrow_mut();
        if let Some(kind) = inner.fail_next.take() {
            return Err(io::Error::from(kind));
        }
        let parse = |key| -> io::Result<u64> {
            env_value(req, key)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| io::Error::other(format!("{key} is not in the environment")))
        };
        let id: WorkerId = parse("HERD_WORKER_ID")?;
        let instance = parse("HERD_INSTANCE")? as usize;
        inner.next_pid += 1;
        let pid = 1000 + inner.next_pid;
        let leader = Leader::new(pid);
        let (exit_tx, exit_rx) = oneshot::channel();
        let reaped = leader.clone();
        let exit = Box::pin(async move {
            let status = exit_rx
                .await
                .map_err(|_| io::Error::other("the fake OS is gone"))?;
            // As spawn::wait_exit: marked reaped before the supervisor hears of the exit.
            reaped.set_reaped();
            Ok(status)
        });
        inner.workers.push(FakeWorker {
            id,
            pid,
            exit: Some(exit_tx),
            exited_at: None,
            ignores_signals: false,
            rss: None,
        });
        inner.calls.push(Call::Spawn(Spawn {
            id,
            instance,
            pid,
            at: Instant::now(),
            env: req
                .env
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string_lossy().into_owned(),
                        v.to_string_lossy().into_owned(),
                    )
                })
                .collect(),
        }));
        Ok(Spawned {
            pid,
            leader,
            stdout: None,
            stderr: None,
            exit,
        })
    }

    fn signal_group(&self, leader: &Leader, signal: Signal) -> bool {
        let mut inner = self.inner.borrow_mut();
        let sent = !leader.reaped();
        let pid = leader.pid();
        inner.calls.push(Call::Signal(Signalled {
            pid,
            group: true,
            signal,
            sent,
            at: Instant::now(),
        }));
        if sent {
            if let Some(w) = inner.workers.iter_mut().find(|w| w.pid == pid) {
                if signal == Signal::KILL || !w.ignores_signals {
                    w.die(ExitStatus::from_raw(signal.as_raw()));
                }
            }
        }
        sent
    }

    fn rss_bytes(&self, pid: u32) -> Option<u64> {
        let mut inner = self.inner.borrow_mut();
        inner.calls.push(Call::Read {
            pid,
            what: Reading::Rss,
            at: Instant::now(),
        });
        inner
            .workers
            .iter()
            .find(|w| w.pid == pid && w.exited_at.is_none())
            .and_then(|w| w.rss)
    }

    fn cpu_ticks(&self, pid: u32) -> Option<u64> {
        let mut inner = self.inner.borrow_mut();
        inner.calls.push(Call::Read {
            pid,
            what: Reading::Cpu,
            at: Instant::now(),
        });
        inner
            .workers
            .iter()
            .find(|w| w.pid == pid && w.exited_at.is_none())
            .map(|_| 0)
    }
}
