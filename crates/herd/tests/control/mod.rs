//! The control socket and the client commands against a running supervisor: `herd status`,
//! `ls`, `reload`, `scale`, `stop`, `start`, `logs`, `send`, and the signals that do the
//! same (SIGHUP, SIGTTIN, SIGTTOU). Every command runs as a real `herd` subprocess with the
//! app's `HERD_HOME`; every app has its own name and its own `HERD_HOME`.

mod keepalive;
mod lifecycle;
mod log_ring;
mod logs;
mod reload;
mod scale;
mod security;
mod signals;
mod status;
mod support;
