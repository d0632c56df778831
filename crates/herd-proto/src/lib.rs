//! Wire formats shared by the herd supervisor and its workers.
//!
//! - [`control`]: requests and answers on the control socket (`herd status`, `reload`, …).
//! - [`event`]: the names of herd's log events.
//! - [`node`]: Node.js cluster IPC messages (JSON lines) and their framing.
//! - [`fdpass`]: `sendmsg`/`recvmsg` with `SCM_RIGHTS`, one message and at most a few fds at a time.
//! - [`notify`]: systemd-style notify datagrams (`READY=1`, `WATCHDOG=1`, …).
//!
//! Nothing here starts a runtime or spawns anything: it is pure encoding plus the two
//! syscalls that carry fds.

pub mod control;
pub mod event;
pub mod fdpass;
pub mod node;
pub mod notify;
