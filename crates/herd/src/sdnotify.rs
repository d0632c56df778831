//! herd under systemd (`Type=notify`): herd itself tells its own manager `READY=1` once every
//! worker is ready, `RELOADING=1` / `READY=1` around a reload, and `STOPPING=1`.
//!
//! The socket comes from herd's own `NOTIFY_SOCKET`, read once at start; workers never
//! inherit it (they get sockets of their own). With `WatchdogSec=` (`WATCHDOG_USEC`, and
//! `WATCHDOG_PID` naming herd if set) herd sends `WATCHDOG=1` every half period from its
//! runtime thread: a supervisor whose event loop hangs stops sending and systemd restarts it.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct Manager {
    target: Target,
}

#[derive(Debug, Clone)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

/// Sends `WATCHDOG=1` every half `WATCHDOG_USEC` while the runtime runs, if asked to.
pub fn watchdog() {
    let Some(manager) = Manager::from_env() else {
        return;
    };
    let Some(usec) = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&u| u > 0)
    else {
        return;
    };
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return;
        }
    }
    let every = std::time::Duration::from_micros(usec / 2).max(std::time::Duration::from_millis(1));
    tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            manager.send("WATCHDOG=1");
        }
    });
}

impl Manager {
    /// From herd's environment, if a service manager is listening.
    pub fn from_env() -> Option<Self> {
        let value = std::env::var_os("NOTIFY_SOCKET")?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(value.as_os_str()).to_vec();
        let target = match bytes.first()? {
            b'@' => Target::Abstract(bytes[1..].to_vec()),
            b'/' => Target::Path(PathBuf::from(value)),
            _ => return None,
        };
        Some(Manager { target })
    }

    /// Sends one datagram; failures are ignored (the manager may be gone).
    pub fn send(&self, text: &str) {
        let Ok(sock) = UnixDatagram::unbound() else {
            return;
        };
        let _ = match &self.target {
            Target::Path(path) => sock.send_to(text.as_bytes(), path),
            Target::Abstract(name) => match SocketAddr::from_abstract_name(name) {
                Ok(addr) => sock.send_to_addr(text.as_bytes(), &addr),
                Err(e) => Err(e),
            },
        };
    }
}
