//! Listening sockets herd itself inherits from its service manager: socket activation
//! *into* herd (a systemd `.socket` unit, `systemd-socket-activate`, or any holder that
//! follows `sd_listen_fds(3)`).
//!
//! The manager binds the port and keeps it while herd restarts, so connections made while
//! no herd runs wait in the socket's queue instead of being refused. herd takes fds 3, 4, …
//! (`LISTEN_FDS` of them) only when `LISTEN_PID` is its own pid, as libsystemd does, and
//! removes `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` from its own environment at
//! once, whether it took them or not: nothing herd runs later (a worker, herd's socket
//! helper) may read them as its own (the `LISTEN_PID` trap of specs/socket-activation.md).
//!
//! plan.rs uses each inherited socket for the `--listen` address it is bound to (and so for
//! Node servers on that port or path); an inherited socket no `--listen` names is an error
//! that names it: silently ignoring it would leave a port that accepts and never answers.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use crate::spec::ListenAddr;

/// At most this many inherited fds (systemd's own limit is far lower in practice).
const MAX_FDS: usize = 1024;

/// One listening socket from the manager.
#[derive(Debug)]
pub struct Inherited {
    /// Its fd number as passed (3, 4, …), for messages.
    pub number: RawFd,
    /// Its name from `LISTEN_FDNAMES`, if given.
    pub name: Option<String>,
    /// The address it is bound to.
    pub addr: ListenAddr,
    pub socket: OwnedFd,
}

impl Inherited {
    /// `fd 3 ("web", 127.0.0.1:8080)`, for messages.
    pub fn describe(&self) -> String {
        match &self.name {
            Some(name) => format!("fd {} ({name:?}, {})", self.number, self.addr),
            None => format!("fd {} ({})", self.number, self.addr),
        }
    }
}

/// Takes the sockets passed to herd, if they are meant for herd. Call once, first thing,
/// while herd has a single thread (it changes the environment).
pub fn take() -> Result<Vec<Inherited>, String> {
    let pid = std::env::var_os("LISTEN_PID");
    let fds = std::env::var_os("LISTEN_FDS");
    let names = std::env::var_os("LISTEN_FDNAMES");
    for key in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(key);
    }
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    if pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        // Meant for another process (an ancestor's variables leaked to herd): not ours.
        return Ok(Vec::new());
    }
    let count = fds
        .to_str()
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&n| n <= MAX_FDS)
        .ok_or_else(|| {
            format!(
                "LISTEN_FDS={} is not a count of sockets (0 to {MAX_FDS})",
                fds.to_string_lossy()
            )
        })?;
    let names: Vec<String> = names
        .map(|n| n.to_string_lossy().split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut taken = Vec::with_capacity(count);
    for i in 0..count {
        let number = crate::spawn::FIRST_FD + i as RawFd;
        // SAFETY: F_GETFD only asks whether the number is an open fd.
        if unsafe { libc::fcntl(number, libc::F_GETFD) } < 0 {
            return Err(format!(
                "LISTEN_FDS={count} but fd {number} is not open — the service manager passed fewer sockets than it announced"
            ));
        }
        // SAFETY: LISTEN_FDS with our pid hands fds 3..3+count to this process; nothing
        // else in herd owns them, and each is taken once.
        let socket = unsafe { OwnedFd::from_raw_fd(number) };
        let name = names.get(i).filter(|n| !n.is_empty()).cloned();
        let addr = listening_addr(&socket).map_err(|problem| {
            format!(
                "inherited fd {number}{}: {problem}",
                name.as_ref()
                    .map(|n| format!(" ({n:?})"))
                    .unwrap_or_default()
            )
        })?;
        taken.push(Inherited {
            number,
            name,
            addr,
            socket,
        });
    }
    Ok(taken)
}

/// The address a passed fd listens on; close-on-exec and non-blocking set on it (Node
/// needs non-blocking listening sockets; workers get their own copies explicitly).
fn listening_addr(fd: &OwnedFd) -> Result<ListenAddr, String> {
    use rustix::net::sockopt;
    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC).map_err(|e| e.to_string())?;
    let kind = sockopt::socket_type(fd).map_err(|_| "not a socket".to_string())?;
    if kind != rustix::net::SocketType::STREAM {
        return Err("not a stream socket (herd serves TCP and unix stream sockets)".into());
    }
    if !sockopt::socket_acceptconn(fd).unwrap_or(false) {
        return Err(
            "not a listening socket (a .socket unit for herd needs Accept=no, the default)".into(),
        );
    }
    rustix::io::ioctl_fionbio(fd, true).map_err(|e| e.to_string())?;
    let sock = socket2::SockRef::from(fd);
    let local = sock.local_addr().map_err(|e| e.to_string())?;
    if let Some(addr) = local.as_socket() {
        let _ = sock.set_tcp_nodelay(true);
        return Ok(ListenAddr::Tcp(addr));
    }
    if let Some(path) = local.as_pathname() {
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    Err("an unnamed or abstract unix socket (herd matches sockets to --listen by address)".into())
}

/// Whether an inherited socket bound to `have` serves `--listen want`.
pub fn matches(want: &ListenAddr, have: &ListenAddr) -> bool {
    match (want, have) {
        (ListenAddr::Tcp(w), ListenAddr::Tcp(h)) => w == h,
        (ListenAddr::Unix(w), ListenAddr::Unix(h)) => {
            std::path::absolute(w).is_ok_and(|w| w == *h) || w == h
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_match_exactly() {
        let a = |s: &str| s.parse::<ListenAddr>().expect("addr");
        assert!(matches(&a("127.0.0.1:8080"), &a("127.0.0.1:8080")));
        assert!(!matches(&a("127.0.0.1:8080"), &a("127.0.0.1:8081")));
        assert!(!matches(&a("8080"), &a("127.0.0.1:8080")));
        assert!(matches(&a("8080"), &a("0.0.0.0:8080")));
        assert!(matches(&a("unix:/run/a.sock"), &a("unix:/run/a.sock")));
        assert!(!matches(&a("unix:/run/a.sock"), &a("127.0.0.1:1")));
    }
}
