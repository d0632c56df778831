//! herd's side of round-robin and sticky balancing: the accept loop and the choice of worker.
//!
//! An accept task per server takes connections off the listening socket (already
//! non-blocking and close-on-exec, straight from `accept4`, never registered with the event
//! loop: the fd only passes through herd) and sends each to the supervisor, which picks a
//! worker and hands the fd over.
//!
//! - **round-robin**: the next *free* worker after the last one chosen, where free means
//!   fewer than [`MAX_UNACKED`] hand-offs it has not answered. A worker whose event loop is
//!   stuck stops answering and so stops receiving. When no worker is free the connection
//!   waits in the server's queue; past [`MAX_QUEUED`] the accept task pauses and the kernel's
//!   backlog holds the rest.
//! - **sticky**: rendezvous hashing of the client's IP address over the worker slots: every
//!   (address, slot) pair gets a score and the best live slot wins. A client keeps its slot
//!   while that slot has a ready worker (a reload replaces the worker, not the slot, so the
//!   client stays); while the slot has none (a crash), its clients go to their next-best slot
//!   instead of waiting, and come back once the slot is ready again. Only the clients of the
//!   missing slot move.

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

use crate::mix::mix64;
use crate::vocab::{Event, ServerId};

/// Hand-offs a worker may leave unanswered before it stops counting as free.
pub const MAX_UNACKED: usize = 8;
/// Connections herd queues per server before it stops accepting.
pub const MAX_QUEUED: usize = 4096;

/// An accepted connection on its way to a worker.
#[derive(Debug)]
pub struct Pending {
    pub fd: OwnedFd,
    /// Hash of the client's IP address (sticky).
    pub peer: u64,
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

    pub fn resume(&self) {
        if self.paused.replace(false) {
            self.resume.notify_one();
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
        let accepted = listener
            .async_io(Interest::READABLE, |fd| {
                rustix::net::acceptfrom_with(
                    fd.as_fd(),
                    SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
                )
                .map_err(io::Error::from)
            })
            .await;
        match accepted {
            Ok((fd, addr)) => {
                let peer = addr.as_ref().map_or(0, peer_hash);
                if tx
                    .send(Event::Conn {
                        server,
                        conn: Pending {
                            fd,
                            peer,
                            attempts: 0,
                            probe: false,
                        },
                    })
                    .is_err()
                {
                    return;
                }
            }
            // The client gave up before we took it, or a transient shortage: carry on
            // (Node's test-cluster-accept-fail).
            Err(e) if is_transient(&e) => {
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
            Err(e) => {
                let _ = tx.send(Event::AcceptFailed {
                    server,
                    error: e.to_string(),
                });
                return;
            }
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

/// Hash of the client's IP address (not the port: a browser opens many connections).
fn peer_hash(addr: &SocketAddrAny) -> u64 {
    match std::net::SocketAddr::try_from(addr.clone()) {
        Ok(sa) => match sa.ip() {
            IpAddr::V4(ip) => mix64(u64::from(u32::from(ip))),
            IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                Some(v4) => mix64(u64::from(u32::from(v4))),
                None => {
                    let bits = u128::from(ip);
                    mix64((bits >> 64) as u64 ^ mix64(bits as u64))
                }
            },
        },
        Err(_) => 0,
    }
}

/// The rendezvous score of a client on a slot.
pub fn sticky_score(peer: u64, instance: usize) -> u64 {
    mix64(peer ^ mix64(instance as u64 + 1))
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

    #[test]
    fn sticky_moves_only_the_missing_slots_clients() {
        let clients: Vec<u64> = (0..2000u64).map(mix64).collect();
        let best = |peer: u64, slots: &[usize]| {
            *slots
                .iter()
                .max_by_key(|&&s| sticky_score(peer, s))
                .expect("slots")
        };
        let all = [0, 1, 2, 3];
        let without_2 = [0, 1, 3];
        let mut counts = [0usize; 4];
        for &c in &clients {
            let before = best(c, &all);
            counts[before] += 1;
            let after = best(c, &without_2);
            if before != 2 {
                assert_eq!(before, after, "a client of a live slot moved");
            }
        }
        // Roughly even: each slot gets 500 ± 20%.
        for n in counts {
            assert!((400..=600).contains(&n), "{counts:?}");
        }
    }
}
