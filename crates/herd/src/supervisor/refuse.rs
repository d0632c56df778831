//! Socket activation with `--balance shared`: while no worker is ready for longer than
//! `--listen-timeout` (a crash loop, a worker that never serves), new connections to the
//! app's listeners are refused quickly instead of waiting in the kernel's queue for a worker
//! that may never come. herd cannot refuse at the kernel (a listening socket accepts for
//! whoever holds it), so it accepts and closes them itself, on a `balance::AcceptThread` per
//! listener (workers hold these sockets too and may clear their O_NONBLOCK flag: never on
//! the runtime thread). It says why once per episode, and stops as soon as a worker is ready.
//!
//! Between a new worker's start and its readiness the thread and the worker compete for
//! connections: the thread's are refused. That is the price of failing fast, paid only after
//! a whole `--listen-timeout` with nothing ready.

use herd_proto::event::EventName;
use serde_json::json;

use super::*;
use crate::balance::{AcceptThread, Take};
use crate::spec::{Balance, WorkerKind};

impl Supervisor {
    /// Starts or stops refusing (see the module doc). Called after every event.
    pub(super) fn refuse_while_nothing_serves(&mut self) {
        if self.plan.kind != WorkerKind::SocketActivation || self.plan.balance != Balance::Shared {
            return;
        }
        let serving = self.workers.values().any(|w| w.state().takes_connections());
        if serving && !self.phase.is_stopping() {
            self.watch_accept_queues(tokio::time::Instant::now());
        } else {
            self.queue_check_due = None;
        }
        if serving || self.phase.is_stopping() {
            self.nothing_serves_since = None;
            if self.refusing {
                self.refusing = false;
                let mut refused = 0;
                for t in &self.refusers {
                    t.set_active(false);
                    refused += t.refused();
                }
                let message = if serving {
                    format!(
                        "a worker is ready: herd stops refusing connections ({refused} refused)"
                    )
                } else {
                    format!("stopping: herd stops refusing connections ({refused} refused)")
                };
                self.logger.event(
                    EventName::Refusing,
                    None,
                    &message,
                    &[("active", json!(false)), ("refused", json!(refused))],
                );
            }
            return;
        }
        let now = tokio::time::Instant::now();
        let wait = self.plan.spec.policy.listen_timeout;
        let since = match self.nothing_serves_since {
            Some(since) => since,
            None => {
                self.nothing_serves_since = Some(now);
                self.after(wait, Event::Reroute);
                now
            }
        };
        if self.refusing || now.duration_since(since) < wait {
            return;
        }
        if self.refusers.is_empty() {
            for l in self.plan.listeners.iter() {
                match AcceptThread::spawn(&l.socket, Take::Refuse, None) {
                    Ok(t) => self.refusers.push(t),
                    Err(e) => {
                        self.logger.event(
                            EventName::Error,
                            None,
                            &format!("cannot start a thread to refuse connections: {e}"),
                            &[],
                        );
                        return;
                    }
                }
            }
        }
        for t in &self.refusers {
            t.set_active(true);
        }
        self.refusing = true;
        let addresses: Vec<String> = self
            .plan
            .listeners
            .iter()
            .map(|l| l.addr.to_string())
            .collect();
        self.logger.event(
            EventName::Refusing,
            None,
            &format!(
                "no worker has been ready for {} (--listen-timeout): herd refuses new connections on {} until one is — see the workers' errors above",
                human(wait),
                addresses.join(", ")
            ),
            &[("active", json!(true))],
        );
    }
}

/// Samples in a row in which a listener's accept queue was not empty and did not shrink,
/// while a worker was ready, before herd says nobody accepts from it (one a second).
const STUCK_SAMPLES: u32 = 3;

/// What herd last saw of one listener's accept queue.
#[derive(Debug, Default, Clone)]
pub(super) struct QueueWatch {
    last: u32,
    streak: u32,
    reported: bool,
}

impl Supervisor {
    /// Socket activation, `shared`, a worker ready: once a second, whether anyone accepts
    /// from herd's listeners. A queue that stays non-empty and never shrinks for
    /// [`STUCK_SAMPLES`] seconds means the "ready" workers serve somewhere else (their own
    /// port: Puma without `--bind-to-activated-sockets`, an app that ignores fd 3) or not at
    /// all. herd says so once per episode, and names in the status text of each ready worker
    /// the listening ports it holds that are not herd's.
    ///
    /// Why this signal: the queue length (`tcpi_unacked` of TCP_INFO on a listening socket)
    /// is exact, costs one getsockopt, and needs no guess about the app; a worker holding
    /// another listening port is not wrong by itself (admin, metrics), so /proc only names
    /// the ports once the queue has shown that nobody accepts.
    pub(super) fn watch_accept_queues(&mut self, now: tokio::time::Instant) {
        if self.queue_check_due.is_some_and(|due| now < due) {
            return;
        }
        let first = self.queue_check_due.is_none();
        self.queue_check_due = Some(now + std::time::Duration::from_secs(1));
        self.after(std::time::Duration::from_secs(1), Event::Reroute);
        if first {
            return;
        }
        let plan = Rc::clone(&self.plan);
        self.queue_watch
            .resize(plan.listeners.len(), QueueWatch::default());
        for (i, l) in plan.listeners.iter().enumerate() {
            let crate::spec::ListenAddr::Tcp(addr) = l.addr else {
                continue;
            };
            let Some(queued) = accept_queue(&l.socket) else {
                continue;
            };
            let watch = &mut self.queue_watch[i];
            if queued > 0 && queued >= watch.last {
                watch.streak += 1;
            } else {
                watch.streak = 0;
            }
            watch.last = queued;
            let (streak, reported) = (watch.streak, watch.reported);
            if streak == 0 && reported {
                self.queue_watch[i].reported = false;
                self.clear_own_port_hints();
                self.logger.event(
                    EventName::Warning,
                    None,
                    &format!("connections on {addr} are accepted again"),
                    &[],
                );
            }
            if streak < STUCK_SAMPLES || reported {
                continue;
            }
            self.queue_watch[i].reported = true;
            let own = self.hint_own_ports(&plan);
            let ready = self
                .workers
                .values()
                .filter(|w| w.state().takes_connections())
                .count();
            self.logger.event(
                EventName::Warning,
                None,
                &format!(
                    "{queued} connections wait on {addr} and no worker accepts them, although {ready} {} ready{own}: a worker must serve the socket herd passes as fd 3 (LISTEN_FDS), not bind its own port — see docs/compat.md (e.g. Puma --bind-to-activated-sockets only)",
                    if ready == 1 { "is" } else { "are" }
                ),
                &[("queued", json!(queued)), ("address", json!(addr.to_string()))],
            );
        }
    }

    /// Sets the status text of each ready worker that holds listening TCP ports other than
    /// herd's; returns them for the log (`; worker 3 listens on :9292`).
    fn hint_own_ports(&mut self, plan: &crate::plan::Plan) -> String {
        let herds: Vec<u16> = plan
            .listeners
            .iter()
            .filter_map(|l| match l.addr {
                crate::spec::ListenAddr::Tcp(a) => Some(a.port()),
                _ => None,
            })
            .collect();
        let mut said = String::new();
        for w in self.workers.values_mut() {
            if !w.state().takes_connections() {
                continue;
            }
            let ports: Vec<u16> = listening_ports(w.pid)
                .into_iter()
                .filter(|p| !herds.contains(p))
                .collect();
            if ports.is_empty() {
                continue;
            }
            let list: Vec<String> = ports.iter().map(|p| format!(":{p}")).collect();
            said.push_str(&format!("; worker {} listens on {}", w.id, list.join(", ")));
            w.status = Some(format!(
                "listens on its own port {} instead of herd's fd 3: see docs/compat.md",
                list.join(", ")
            ));
            w.own_port_hint = true;
        }
        said
    }

    fn clear_own_port_hints(&mut self) {
        for w in self.workers.values_mut() {
            if std::mem::take(&mut w.own_port_hint) {
                w.status = None;
            }
        }
    }
}

/// Connections waiting in a listening TCP socket's accept queue (`tcpi_unacked` of
/// TCP_INFO, which a listening socket fills with its backlog's length).
fn accept_queue(socket: &std::os::fd::OwnedFd) -> Option<u32> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain old data; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid fd, pointer and length for the duration of the call.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (r == 0 && info.tcpi_state == 10).then_some(info.tcpi_unacked)
}

/// Local ports of the listening TCP sockets process `pid` holds (from /proc: its fds'
/// socket inodes matched against its network namespace's tcp tables). Bounded reads;
/// empty when anything is unreadable.
fn listening_ports(pid: u32) -> Vec<u16> {
    use std::io::Read;
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let inodes: std::collections::BTreeSet<u64> = dir
        .take(65_536)
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect();
    let mut ports = std::collections::BTreeSet::new();
    for table in ["tcp", "tcp6"] {
        let mut text = String::new();
        let Ok(f) = std::fs::File::open(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        if f.take(4 << 20).read_to_string(&mut text).is_err() {
            continue;
        }
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(&"0A"), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let listening_here = inode.parse::<u64>().is_ok_and(|i| inodes.contains(&i));
            let port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if let (true, Some(port)) = (listening_here, port) {
                ports.insert(port);
            }
        }
    }
    ports.into_iter().collect()
}
