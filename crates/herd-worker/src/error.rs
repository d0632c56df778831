//! The one error type of this crate. Every message says what is wrong and what to do.

use std::io;
use std::os::fd::RawFd;

use herd_proto::notify::DatagramError;

/// What can go wrong taking the inherited sockets or talking to the supervisor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `LISTEN_FDS` is not set: the program was not started with sockets to serve.
    #[error(
        "LISTEN_FDS is not set: run this program under herd (herd run -l 3000 ./hello) \
         or systemd socket activation"
    )]
    NotActivated,

    /// `LISTEN_FDS` is set but `LISTEN_PID` is not, so nothing says the fds are ours.
    #[error(
        "LISTEN_FDS is set but LISTEN_PID is not, so fds 3.. may not be the listening sockets: \
         whatever started this program must set LISTEN_PID to the program's own pid \
         (herd and systemd do)"
    )]
    ListenPidMissing,

    /// `LISTEN_PID` names another process: the variables were inherited, the fds were not.
    #[error(
        "LISTEN_PID is {listen_pid} but this process is {pid}: the LISTEN_* variables were \
         inherited from a parent process that did not unset them, so fds 3.. are not \
         listening sockets meant for this process; start it directly under herd, or have the \
         parent unset LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES"
    )]
    ListenPidMismatch { listen_pid: String, pid: u32 },

    /// An environment variable herd sets has a value this crate cannot use.
    #[error("{var}={value:?} is not valid: expected {expected}")]
    InvalidVar {
        var: &'static str,
        value: String,
        expected: &'static str,
    },

    /// `LISTEN_FDNAMES` does not name every fd.
    #[error(
        "LISTEN_FDNAMES has {names} names but LISTEN_FDS is {fds}: \
         whatever started this program must give one name per fd, separated by ':'"
    )]
    NameCountMismatch { names: usize, fds: usize },

    /// An announced fd is not open in this process.
    #[error(
        "LISTEN_FDS announces fd {fd} ({name:?}) but it is not open in this process: \
         something between herd and this program closed it (a wrapper script?)"
    )]
    FdNotOpen { fd: RawFd, name: String },

    /// An announced fd could not be inspected or configured.
    #[error("cannot use inherited fd {fd} ({name:?}): {source}")]
    Fd {
        fd: RawFd,
        name: String,
        source: io::Error,
    },

    /// An announced fd is not a TCP or unix stream socket in the listening state.
    #[error(
        "inherited fd {fd} ({name:?}) is {what}; herd-worker only takes listening TCP and \
         unix stream sockets: check the --listen addresses given to herd"
    )]
    Unsupported {
        fd: RawFd,
        name: String,
        what: String,
    },

    /// [`listeners`](crate::listeners) was called twice.
    #[error(
        "the inherited listening sockets were already taken by an earlier call to \
         herd_worker::listeners(): call it once and keep what it returns"
    )]
    AlreadyTaken,

    /// [`tcp_listener`](crate::tcp_listener) found only non-TCP listeners.
    #[error(
        "no TCP listener among the inherited sockets ({names}): give herd a TCP address, \
         e.g. herd run -l 3000"
    )]
    NoTcpListener { names: String },

    /// The message does not fit in one notify datagram.
    #[error("cannot send notify message: {0}")]
    NotifyTooLarge(#[from] DatagramError),

    /// The datagram to `NOTIFY_SOCKET` could not be sent.
    #[error(
        "cannot send {datagram:?} to NOTIFY_SOCKET={socket}: {source} \
         (is the supervisor that set NOTIFY_SOCKET still running?)"
    )]
    Notify {
        socket: String,
        datagram: String,
        source: io::Error,
    },
}
