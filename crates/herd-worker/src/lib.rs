//! Library for Rust programs run as herd workers.
//!
//! herd runs N copies of a server program that share one listening port. It hands every
//! worker the same listening sockets the way systemd's socket activation does
//! (`sd_listen_fds(3)`), and takes readiness the way `sd_notify(3)` sends it, so a program
//! using this crate also runs under systemd unchanged.
//!
//! # Listening sockets: [`listeners`]
//!
//! herd binds each `--listen` address once, then starts every worker with:
//!
//! - the listening sockets at fds 3, 4, … in the order they were declared;
//! - `LISTEN_FDS=<count>` and `LISTEN_FDNAMES=<name1>:<name2>…`;
//! - `LISTEN_PID=<the worker's own pid>`. A process that finds another pid there did not get
//!   the sockets from herd: it inherited the variables from a parent that forgot to unset
//!   them, and fds 3.. are something else. [`listeners`] refuses such an environment.
//!
//! [`listeners`] checks all that, takes ownership of the fds, marks them close-on-exec and
//! removes the `LISTEN_*` variables, so that programs this worker starts do not believe the
//! sockets are theirs. Every worker accepts from the same kernel queue (herd's `shared`
//! balancing): a connection goes to whichever worker accepts first, and the queue outlives
//! any one worker, so a worker that dies or stops loses no connection still waiting in it.
//!
//! The sockets' file status flags (`O_NONBLOCK`) are shared by every worker, because they
//! all hold the same open socket: change them only to what every worker of the app expects.
//! An async runtime needs `O_NONBLOCK` anyway.
//!
//! # Readiness and watchdog: [`notify_ready`], [`notify_watchdog`], …
//!
//! herd gives each worker its own `NOTIFY_SOCKET`, a unix datagram socket (a path, or an
//! abstract name written with a leading `@`). A worker sends `READY=1` once it accepts
//! connections: only then does herd count it as ready, and a rolling reload moves on to the
//! next worker only then. When `WATCHDOG_USEC` is set, herd also expects `WATCHDOG=1` at
//! least that often and treats silence as a hang; [`watchdog_interval`] says how often to
//! send it. All notify functions do nothing and return `Ok(false)` when `NOTIFY_SOCKET` is
//! not set, so a program can call them unconditionally.
//!
//! ```no_run
//! # fn main() -> Result<(), herd_worker::Error> {
//! let listener = herd_worker::tcp_listener()?;
//! herd_worker::notify_ready()?;
//! for stream in listener.incoming() {
//!     // serve it…
//! #   drop(stream);
//! }
//! # Ok(())
//! # }
//! ```

mod error;
mod listen;
mod notify;

pub use error::Error;
pub use listen::{listeners, tcp_listener, Listener, Socket};
pub use notify::{
    notify, notify_ready, notify_status, notify_stopping, notify_watchdog, spawn_watchdog_thread,
    watchdog_interval, watchdog_timeout,
};

/// The notify messages, re-exported for [`notify`].
pub use herd_proto::notify::Message;
