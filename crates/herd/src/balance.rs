//! herd's side of round-robin balancing: the accept loop and the choice of worker.
//!
//! An accept task per server takes connections off the listening socket (already
//! non-blocking and close-on-exec, straight from `accept4`, never registered with the event
//! loop: the fd only passes through herd) until the queue is empty, at most
//! [`ACCEPT_BATCH`] per wake-up, and sends them in one event to the supervisor, which picks
//! a worker for each and hands the fd over.
//!
//! - **round-robin**: the next *free* worker after the last one chosen, where free means
//!   fewer than [`MAX_UNACKED`] hand-offs it has not answered. A worker whose event loop is
//!   stuck stops answering and so stops receiving. When no worker is free the connection
//!   waits in the server's queue; past [`MAX_QUEUED`] the accept task pauses and the kernel's
//!   backlog holds the rest.
//! - **hash, sticky** (Node): the kernel picks the worker (see `reuseport`); herd runs this
//!   loop only on the socket of a slot that has no ready worker, to hand the connections
//!   already queued there to ready workers (sticky: to the slot the kernel now gives the
//!   client's address).

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

/// Hand-offs a worker may leave unanswered before it stops counting as free.
pub const MAX_UNACKED: usize = 8;
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

/// Accepts connections on `listener` and closes them at once, until the task is aborted: for
/// the socket of a slot that will never have a worker again (socket activation, scaled away
/// or errored), so that clients queued there are refused quickly instead of waiting forever.
pub async fn refuse_loop(listener: Rc<OwnedFd>) {
    // Socket-activation workers get their sockets blocking; an accept that blocked would stop
    // herd's one runtime thread. It stays non-blocking afterwards (if the slot comes back
    // after a `herd restart`, as if a worker had made it so).
    if rustix::io::ioctl_fionbio(&*listener, true).is_err() {
        return;
    }
    // SAFETY: the Rc keeps the fd open for as long as the AsyncFd (which holds a clone) lives.
    let Ok(listener) = (unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) })
    else {
        return;
    };
    loop {
        let accepted = listener
            .async_io(Interest::READABLE, |fd| {
                // Again before each accept: a process that still holds the socket (one a
                // worker left behind outside its group) could have cleared the flag.
                rustix::io::ioctl_fionbio(fd, true)?;
                rustix::net::accept_with(fd.as_fd(), SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)
                    .map_err(io::Error::from)
            })
            .await;
        match accepted {
            Ok(conn) => drop(conn),
            Err(e) if is_transient(&e) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(_) => return,
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
