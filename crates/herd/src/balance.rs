//! herd's side of round-robin balancing: the accept loop and the choice of worker.
//!
//! An accept task per server takes connections off the listening socket (already
//! non-blocking and close-on-exec, straight from `accept4`, never registered with the event
//! loop: the fd only passes through herd) until the queue is empty, at most
//! [`ACCEPT_BATCH`] per wake-up, and sends them in one event to the supervisor, which picks
//! a worker for each and hands the fd over.
//!
//! - **round-robin**: the next *free* worker after the last one chosen, where free means
//!   fewer than [`MAX_UNACKED`] (one) hand-offs it has not answered. A worker whose event
//!   loop is busy or stuck answers late and so stops receiving. When no worker is free the connection
//!   waits in the server's queue; past [`MAX_QUEUED`] the accept task pauses and the kernel's
//!   backlog holds the rest.
//! - **hash, sticky** (Node): the kernel picks the worker (see `reuseport`); herd accepts
//!   only from the socket of a slot that has no ready worker, to hand the connections
//!   already queued there to ready workers (sticky: to the slot the kernel now gives the
//!   client's address). Workers hold those sockets too, so that accept runs on an
//!   [`AcceptThread`], never on the runtime thread.

use std::cell::Cell;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;

use rustix::net::{SocketAddrAny, SocketFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::Notify;

use crate::vocab::{Event, ServerId};

/// Hand-offs a worker may leave unanswered before it stops counting as free: one, as
/// Node's own free list. A worker answers a hand-off from its event loop, so one that is
/// busy with a slow request answers late and gets nothing more meanwhile; the next
/// connection goes to a worker that is idle instead of queueing behind the slow request.
/// Measured (bench/balance.py, 2 workers, mixed 1 ms / 50 ms requests): p99 0.95× Node
/// round-robin's with one, 1.07–1.15× with eight (which pipelined hand-offs to busy
/// workers); WORK_MS 0 throughput stays at Node's. `hash` is the mode for raw throughput.
pub const MAX_UNACKED: usize = 1;
/// Connections herd queues per server before it stops accepting.
pub const MAX_QUEUED: usize = 4096;
/// Connections one wake-up of an accept loop takes before the supervisor routes them.
pub const ACCEPT_BATCH: usize = 32;

/// An accepted connection on its way to a worker.
#[derive(Debug)]
pub struct Pending {
    pub fd: OwnedFd,
    /// The client's IP address (sticky: which slot it belongs to).
    pub peer: Option<IpAddr>,
    /// Workers that refused it or died holding it.
    pub attempts: u8,
    /// herd's own health probe for one worker: never re-routed to another.
    pub probe: bool,
}

/// Lets the supervisor pause an accept loop while too many connections wait.
#[derive(Default)]
pub struct AcceptGate {
    paused: Cell<bool>,
    resume: Notify,
}

impl AcceptGate {
    pub fn pause(&self) {
        self.paused.set(true);
    }

    /// Wakes every accept loop of the server (hash and sticky drain several slots' sockets
    /// through one gate). A loop checks `paused` and starts waiting without yielding in
    /// between, so no wake-up is lost.
    pub fn resume(&self) {
        if self.paused.replace(false) {
            self.resume.notify_waiters();
        }
    }
}

/// Accepts connections on `listener` until the task is aborted.
pub async fn accept_loop(
    server: ServerId,
    listener: Rc<OwnedFd>,
    gate: Rc<AcceptGate>,
    tx: UnboundedSender<Event>,
) {
    // SAFETY: the Rc keeps the fd open for as long as the AsyncFd (which holds a clone) lives.
    let registered = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) };
    let listener = match registered.map_err(|e| e.into_parts().1) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = tx.send(Event::AcceptFailed {
                server,
                error: e.to_string(),
            });
            return;
        }
    };
    loop {
        if gate.paused.get() {
            gate.resume.notified().await;
            continue;
        }
        let mut guard = match listener.readable().await {
            Ok(guard) => guard,
            Err(e) => {
                let _ = tx.send(Event::AcceptFailed {
                    server,
                    error: e.to_string(),
                });
                return;
            }
        };
        // Everything queued, up to a batch: one event for the supervisor, and tokio learns
        // from the accept that found the queue empty that it must wait for the next edge.
        let mut conns = Vec::new();
        let mut failed = None;
        let _ = guard.try_io(|fd| loop {
            match rustix::net::acceptfrom_with(
                fd.as_fd(),
                SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            ) {
                Ok((fd, addr)) => {
                    conns.push(Pending {
                        fd,
                        peer: addr.as_ref().and_then(peer_ip),
                        attempts: 0,
                        probe: false,
                    });
                    if conns.len() == ACCEPT_BATCH {
                        return Ok(());
                    }
                }
                Err(rustix::io::Errno::AGAIN) => return Err(io::ErrorKind::WouldBlock.into()),
                Err(e) => {
                    failed = Some(io::Error::from(e));
                    return Ok(());
                }
            }
        });
        let full = conns.len() == ACCEPT_BATCH;
        if !conns.is_empty() && tx.send(Event::Conns { server, conns }).is_err() {
            return;
        }
        match failed {
            None if full => {
                // A long backlog: let the supervisor route this batch (and pause the gate
                // past MAX_QUEUED) before taking more.
                tokio::task::yield_now().await;
            }
            None => {}
            // The client gave up before we took it, or a transient shortage: carry on
            // (Node's test-cluster-accept-fail).
            Some(e) if is_transient(&e) => {
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
            Some(e) => {
                let _ = tx.send(Event::AcceptFailed {
                    server,
                    error: e.to_string(),
                });
                return;
            }
        }
    }
}

/// What an [`AcceptThread`] does with the connections it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Hands them to the runtime in batches (Node, hash and sticky: a dead slot's queue).
    Hand,
    /// Closes them at once: the socket of a slot that will not have a worker again
    /// (socket activation, scaled away or errored), so its clients fail fast.
    Refuse,
}

/// Batches of connections an accept thread may have handed over and the runtime not yet
/// taken: past this the thread waits, and the kernel's backlog holds the rest.
const THREAD_BATCHES: usize = 4;

/// Accepts on a listening socket that workers also hold, on a thread of its own.
///
/// A worker shares the socket's open file description, and with it the O_NONBLOCK flag: it
/// can clear the flag at any moment (`fcntl` on its copy), and an `accept4` that finds the
/// queue empty then blocks. That must never be herd's runtime thread (status, signals and
/// every other app would stop), so herd accepts from such sockets only here: the thread
/// waits in `poll` on the socket and a wake-up pipe, accepts one connection at a time, and
/// hands them over through a bounded channel. If a hostile worker makes its accept block,
/// only this thread waits — until the next connection, which it hands over (or closes)
/// like any other; the runtime never waits for it.
///
/// One per socket, kept for the socket's life and switched on and off
/// ([`AcceptThread::set_active`]) as its slot dies and comes back; dropping it ends it.
pub struct AcceptThread {
    control: std::sync::Arc<ThreadControl>,
    wake: OwnedFd,
}

struct ThreadControl {
    active: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    /// Connections closed in [`Take::Refuse`] mode.
    refused: std::sync::atomic::AtomicU64,
}

impl AcceptThread {
    /// Starts the thread, active. `hand` receives the batches in [`Take::Hand`] mode.
    pub fn spawn(
        listener: &OwnedFd,
        take: Take,
        hand: Option<tokio::sync::mpsc::Sender<Vec<Pending>>>,
    ) -> io::Result<Self> {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        let listener = listener.try_clone()?;
        let (wake_r, wake_w) = rustix::pipe::pipe_with(
            rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
        )?;
        let control = std::sync::Arc::new(ThreadControl {
            active: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            refused: AtomicU64::new(0),
        });
        let theirs = std::sync::Arc::clone(&control);
        std::thread::Builder::new()
            .name("herd-accept".into())
            .spawn(move || thread_loop(listener, wake_r, theirs, take, hand))?;
        Ok(AcceptThread {
            control,
            wake: wake_w,
        })
    }

    /// Starts or stops accepting (the thread stays, waiting, for the next time).
    pub fn set_active(&self, on: bool) {
        use std::sync::atomic::Ordering;
        if self.control.active.swap(on, Ordering::SeqCst) != on {
            self.poke();
        }
    }

    /// Connections closed so far ([`Take::Refuse`]).
    pub fn refused(&self) -> u64 {
        self.control
            .refused
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn poke(&self) {
        // A full pipe already holds a wake-up.
        let _ = rustix::io::write(&self.wake, &[1]);
    }
}

impl Drop for AcceptThread {
    fn drop(&mut self) {
        self.control
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.poke();
    }
}

/// Waits until `fd` (and, when `listener` is given, that too) is readable. Returns whether
/// the listener is.
fn wait_readable(wake: &OwnedFd, listener: Option<&OwnedFd>) -> bool {
    use std::os::fd::AsRawFd;
    let mut fds = [
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: listener.map_or(-1, |l| l.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
    if n <= 0 {
        return false;
    }
    if fds[0].revents != 0 {
        let mut buf = [0u8; 64];
        while matches!(rustix::io::read(wake, &mut buf), Ok(n) if n > 0) {}
    }
    // POLLERR/POLLHUP too: the accept then says what is wrong (and never spins).
    fds[1].revents != 0
}

/// Whether more connections are queued right now (never waits).
fn queued(listener: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, 0) == 1 && fd.revents & libc::POLLIN != 0 }
}

fn thread_loop(
    listener: OwnedFd,
    wake: OwnedFd,
    control: std::sync::Arc<ThreadControl>,
    take: Take,
    hand: Option<tokio::sync::mpsc::Sender<Vec<Pending>>>,
) {
    use std::sync::atomic::Ordering;
    loop {
        if control.stop.load(Ordering::SeqCst) {
            return;
        }
        let active = control.active.load(Ordering::SeqCst);
        // Again after the wait: switched off meanwhile (the wake-up and a connection can
        // arrive together), it must leave that connection to the workers.
        if !wait_readable(&wake, active.then_some(&listener))
            || !control.active.load(Ordering::SeqCst)
        {
            continue;
        }
        // One at a time, and only what poll says is queued: with O_NONBLOCK cleared under
        // us, an accept on an empty queue waits here (this thread only) for the next one.
        let mut conns = Vec::new();
        loop {
            match rustix::net::acceptfrom_with(
                &listener,
                SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            ) {
                Ok((fd, addr)) => match take {
                    Take::Refuse => {
                        drop(fd);
                        control.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Take::Hand => conns.push(Pending {
                        fd,
                        peer: addr.as_ref().and_then(peer_ip),
                        attempts: 0,
                        probe: false,
                    }),
                },
                Err(rustix::io::Errno::AGAIN) => break,
                Err(e) => {
                    if is_transient(&io::Error::from(e)) {
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        break;
                    }
                    // Not a listening socket any more (a worker shut it down): wait for
                    // the wake-up that ends or restarts this thread.
                    control.active.store(false, Ordering::SeqCst);
                    break;
                }
            }
            if conns.len() == ACCEPT_BATCH || !queued(&listener) {
                break;
            }
        }
        if !conns.is_empty() {
            let Some(hand) = &hand else { return };
            // Bounded: while the runtime has not taken the earlier batches, this waits and
            // the kernel's backlog holds the rest.
            if hand.blocking_send(conns).is_err() {
                return;
            }
        }
    }
}

/// The channel an [`AcceptThread`] in [`Take::Hand`] mode feeds, and the task that forwards
/// its batches to the supervisor (pausing with the server's gate).
pub fn hand_channel() -> (
    tokio::sync::mpsc::Sender<Vec<Pending>>,
    tokio::sync::mpsc::Receiver<Vec<Pending>>,
) {
    tokio::sync::mpsc::channel(THREAD_BATCHES)
}

/// Forwards an accept thread's batches to the supervisor until the task is aborted.
pub async fn forward_loop(
    server: ServerId,
    mut rx: tokio::sync::mpsc::Receiver<Vec<Pending>>,
    gate: Rc<AcceptGate>,
    tx: UnboundedSender<Event>,
) {
    loop {
        if gate.paused.get() {
            gate.resume.notified().await;
            continue;
        }
        let Some(conns) = rx.recv().await else {
            return;
        };
        if tx.send(Event::Conns { server, conns }).is_err() {
            return;
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EINTR
                | libc::EPROTO
                | libc::EPERM
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
        )
    )
}

/// The client's IP address.
fn peer_ip(addr: &SocketAddrAny) -> Option<IpAddr> {
    std::net::SocketAddr::try_from(addr.clone())
        .ok()
        .map(|sa| sa.ip())
}

/// Picks the next eligible worker after `cursor` among `candidates`, advancing the cursor.
pub fn next_free<T: Copy>(
    candidates: &[T],
    cursor: &mut usize,
    eligible: impl Fn(T) -> bool,
) -> Option<T> {
    let n = candidates.len();
    for step in 0..n {
        let i = (*cursor + step) % n;
        if eligible(candidates[i]) {
            *cursor = (i + 1) % n;
            return Some(candidates[i]);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_skips_busy_workers_and_rotates() {
        let workers = [1, 2, 3];
        let mut cursor = 0;
        let picks: Vec<_> = (0..4)
            .map(|_| next_free(&workers, &mut cursor, |_| true))
            .collect();
        assert_eq!(picks, [Some(1), Some(2), Some(3), Some(1)]);
        assert_eq!(next_free(&workers, &mut cursor, |w| w != 2), Some(3));
        assert_eq!(next_free(&workers, &mut cursor, |_| false), None);
        assert_eq!(next_free::<u32>(&[], &mut cursor, |_| true), None);
    }
}
