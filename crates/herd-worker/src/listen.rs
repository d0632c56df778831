//! Taking the listening sockets herd (or systemd) passed at fds 3.. (`sd_listen_fds(3)`).
//!
//! Reading the environment is kept apart from adopting fds: [`parse_env`] is pure and decides
//! which fd numbers are ours and their names; [`adopt`] checks that one fd is a listening
//! stream socket, marks it close-on-exec and wraps it in the matching std type.

use std::ffi::OsString;
use std::fmt;
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::io::{fcntl_getfd, fcntl_setfd, Errno, FdFlags};
use rustix::net::{sockopt, AddressFamily, SocketType};

use crate::Error;

/// The first passed fd, after stdin, stdout and stderr.
const FIRST_FD: RawFd = 3;

/// More would be a misconfiguration, not a server: refuse it before touching any fd.
const MAX_FDS: usize = 1024;

/// Name systemd gives fds when `LISTEN_FDNAMES` is not set.
const DEFAULT_NAME: &str = "unknown";

/// Set once the fds have been adopted: a second owner of the same fd would close it twice.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// One inherited listening socket.
#[derive(Debug)]
pub struct Listener {
    /// Its name from `LISTEN_FDNAMES` (`"unknown"` when that is not set).
    pub name: String,
    /// The fd number it was inherited at (3, 4, …); the socket still uses it.
    pub fd: RawFd,
    pub socket: Socket,
}

/// A listening stream socket, as the std type that fits its address family.
#[derive(Debug)]
pub enum Socket {
    /// An `AF_INET` or `AF_INET6` stream socket.
    Tcp(TcpListener),
    /// An `AF_UNIX` stream socket.
    Unix(UnixListener),
}

impl Listener {
    /// The socket if it is TCP.
    pub fn into_tcp(self) -> Option<TcpListener> {
        match self.socket {
            Socket::Tcp(l) => Some(l),
            Socket::Unix(_) => None,
        }
    }

    /// The socket if it is a unix socket.
    pub fn into_unix(self) -> Option<UnixListener> {
        match self.socket {
            Socket::Unix(l) => Some(l),
            Socket::Tcp(_) => None,
        }
    }
}

impl fmt::Display for Socket {
    /// The bound address as herd's `--listen` writes it: `127.0.0.1:3000`, `[::1]:3000`,
    /// `unix:/run/app.sock`, `unix:@abstract`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Socket::Tcp(l) => match l.local_addr() {
                Ok(addr) => write!(f, "{addr}"),
                Err(_) => f.write_str("tcp:?"),
            },
            Socket::Unix(l) => {
                let Ok(addr) = l.local_addr() else {
                    return f.write_str("unix:?");
                };
                if let Some(path) = addr.as_pathname() {
                    return write!(f, "unix:{}", path.display());
                }
                #[cfg(any(target_os = "linux", target_os = "android"))]
                {
                    use std::os::linux::net::SocketAddrExt;
                    if let Some(name) = addr.as_abstract_name() {
                        return write!(f, "unix:@{}", String::from_utf8_lossy(name));
                    }
                }
                f.write_str("unix:(unnamed)")
            }
        }
    }
}

/// Takes the listening sockets passed to this process, in the order they were declared.
///
/// Reads `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES`, then removes them from the
/// environment (whatever the outcome, as `sd_listen_fds(1)` does) so child processes do not
/// mistake them for theirs. Because it changes the environment, call it early, before the
/// program starts threads that read the environment.
///
/// Errors: [`Error::NotActivated`] when `LISTEN_FDS` is not set (the program can fall back to
/// binding a port itself); [`Error::ListenPidMissing`] / [`Error::ListenPidMismatch`] when the
/// variables were not meant for this process; an fd error when an announced fd is closed or
/// is not a listening TCP or unix stream socket; [`Error::AlreadyTaken`] on a second call.
/// `LISTEN_FDS=0` gives an empty list.
pub fn listeners() -> Result<Vec<Listener>, Error> {
    if TAKEN.load(Ordering::SeqCst) {
        return Err(Error::AlreadyTaken);
    }
    let fds = std::env::var_os("LISTEN_FDS");
    let pid = std::env::var_os("LISTEN_PID");
    let names = std::env::var_os("LISTEN_FDNAMES");
    for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let env = Env { fds, pid, names };
    let announced = parse_env(&env, std::process::id())?;
    if announced.is_empty() {
        return Ok(Vec::new());
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(Error::AlreadyTaken);
    }
    announced
        .into_iter()
        .map(|(fd, name)| adopt(fd, name))
        .collect()
}

/// The first TCP listener passed to this process; any other inherited socket is closed.
///
/// For the common case of a program that serves one port. Use [`listeners`] to serve
/// several, or unix sockets.
pub fn tcp_listener() -> Result<TcpListener, Error> {
    let all = listeners()?;
    let names: Vec<String> = all
        .iter()
        .map(|l| format!("{}: {}", l.name, l.socket))
        .collect();
    all.into_iter()
        .find_map(Listener::into_tcp)
        .ok_or_else(|| Error::NoTcpListener {
            names: if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            },
        })
}

/// The three variables, as read from the environment.
#[derive(Debug, Default)]
pub(crate) struct Env {
    pub fds: Option<OsString>,
    pub pid: Option<OsString>,
    pub names: Option<OsString>,
}

/// Which fds are ours and their names, from the variables and this process's pid.
pub(crate) fn parse_env(env: &Env, my_pid: u32) -> Result<Vec<(RawFd, String)>, Error> {
    let fds = env.fds.as_ref().ok_or(Error::NotActivated)?;
    let fds = utf8("LISTEN_FDS", fds, "a number of fds")?;
    let count: usize = match fds.parse() {
        Ok(n) if n <= MAX_FDS && fds.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => {
            return Err(Error::InvalidVar {
                var: "LISTEN_FDS",
                value: fds.to_owned(),
                expected: "a number of fds from 0 to 1024",
            })
        }
    };

    let pid = env.pid.as_ref().ok_or(Error::ListenPidMissing)?;
    let pid = utf8("LISTEN_PID", pid, "a process id")?;
    if pid.parse::<u32>().ok() != Some(my_pid) {
        return Err(Error::ListenPidMismatch {
            listen_pid: pid.to_owned(),
            pid: my_pid,
        });
    }

    let names: Vec<String> = match &env.names {
        None => vec![DEFAULT_NAME.to_owned(); count],
        Some(names) => {
            let names = utf8("LISTEN_FDNAMES", names, "names separated by ':'")?;
            let names: Vec<String> = if count == 0 && names.is_empty() {
                Vec::new()
            } else {
                names.split(':').map(str::to_owned).collect()
            };
            if names.len() != count {
                return Err(Error::NameCountMismatch {
                    names: names.len(),
                    fds: count,
                });
            }
            names
        }
    };
    Ok((FIRST_FD..).zip(names).collect())
}

fn utf8<'a>(
    var: &'static str,
    value: &'a OsString,
    expected: &'static str,
) -> Result<&'a str, Error> {
    value.to_str().ok_or_else(|| Error::InvalidVar {
        var,
        value: value.to_string_lossy().into_owned(),
        expected,
    })
}

/// Checks that `fd` is an open listening stream socket, sets `FD_CLOEXEC` on it and takes
/// ownership of it. Leaves `fd` untouched (open, not owned) on error.
pub(crate) fn adopt(fd: RawFd, name: String) -> Result<Listener, Error> {
    // SAFETY: F_GETFD on an arbitrary number only reads the fd table; it fails with EBADF
    // when the number is not open, which is what we check before borrowing it.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(Error::FdNotOpen { fd, name });
    }
    // SAFETY: the fd is open (checked above) and nothing in this function closes it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let tcp = match classify(borrowed) {
        Ok(Kind::Tcp) => true,
        Ok(Kind::Unix) => false,
        Ok(Kind::Other(what)) => return Err(Error::Unsupported { fd, name, what }),
        Err(source) => {
            return Err(Error::Fd {
                fd,
                name,
                source: source.into(),
            })
        }
    };
    let flags = fcntl_getfd(borrowed).map_err(|e| fd_error(fd, &name, e))?;
    fcntl_setfd(borrowed, flags | FdFlags::CLOEXEC).map_err(|e| fd_error(fd, &name, e))?;

    // SAFETY: the LISTEN_FDS contract hands fds 3..3+N to this process, and `TAKEN` (or, in
    // tests, the test's own fd) guarantees no other owner within this crate.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let socket = if tcp {
        Socket::Tcp(TcpListener::from(owned))
    } else {
        Socket::Unix(UnixListener::from(owned))
    };
    Ok(Listener { name, fd, socket })
}

fn fd_error(fd: RawFd, name: &str, e: Errno) -> Error {
    Error::Fd {
        fd,
        name: name.to_owned(),
        source: e.into(),
    }
}

enum Kind {
    Tcp,
    Unix,
    /// Not usable, with a description for the error message.
    Other(String),
}

fn classify(fd: BorrowedFd<'_>) -> Result<Kind, Errno> {
    let kind = match sockopt::socket_type(fd) {
        Ok(kind) => kind,
        Err(Errno::NOTSOCK) => return Ok(Kind::Other("not a socket".into())),
        Err(e) => return Err(e),
    };
    if kind != SocketType::STREAM {
        let kind = match kind {
            SocketType::DGRAM => "a datagram socket (UDP?)".to_owned(),
            SocketType::SEQPACKET => "a seqpacket socket".to_owned(),
            other => format!("a socket of type {}", other.as_raw()),
        };
        return Ok(Kind::Other(kind));
    }
    let family = rustix::net::getsockname(fd.as_fd())?.address_family();
    let kind = match family {
        AddressFamily::INET | AddressFamily::INET6 => Kind::Tcp,
        AddressFamily::UNIX => Kind::Unix,
        other => {
            return Ok(Kind::Other(format!(
                "a socket of family {}",
                other.as_raw()
            )))
        }
    };
    if !sockopt::socket_acceptconn(fd)? {
        return Ok(Kind::Other("a stream socket that is not listening".into()));
    }
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpStream, UdpSocket};
    use std::os::fd::{AsRawFd, IntoRawFd};

    fn env(fds: Option<&str>, pid: Option<&str>, names: Option<&str>) -> Env {
        Env {
            fds: fds.map(Into::into),
            pid: pid.map(Into::into),
            names: names.map(Into::into),
        }
    }

    #[test]
    fn fds_start_at_three_with_their_names() {
        let got = parse_env(&env(Some("2"), Some("42"), Some("http:admin")), 42).expect("valid");
        assert_eq!(got, vec![(3, "http".to_owned()), (4, "admin".to_owned())]);
    }

    #[test]
    fn names_default_to_unknown() {
        let got = parse_env(&env(Some("2"), Some("42"), None), 42).expect("valid");
        assert_eq!(
            got,
            vec![(3, "unknown".to_owned()), (4, "unknown".to_owned())]
        );
    }

    #[test]
    fn zero_fds_is_an_empty_list() {
        assert!(parse_env(&env(Some("0"), Some("42"), None), 42)
            .expect("valid")
            .is_empty());
        assert!(parse_env(&env(Some("0"), Some("42"), Some("")), 42)
            .expect("valid")
            .is_empty());
    }

    #[test]
    fn missing_listen_fds_means_not_activated() {
        let err = parse_env(&env(None, Some("42"), None), 42).expect_err("not activated");
        assert!(matches!(err, Error::NotActivated));
        assert!(
            err.to_string().contains("run this program under herd"),
            "{err}"
        );
    }

    #[test]
    fn listen_pid_must_be_present() {
        let err = parse_env(&env(Some("1"), None, None), 42).expect_err("no pid");
        assert!(matches!(err, Error::ListenPidMissing), "{err}");
    }

    #[test]
    fn listen_pid_of_another_process_is_refused() {
        for pid in ["41", "", "abc", "-42", " 42"] {
            let err = parse_env(&env(Some("1"), Some(pid), None), 42).expect_err(pid);
            assert!(
                matches!(err, Error::ListenPidMismatch { pid: 42, .. }),
                "{pid}: {err}"
            );
        }
        let err = parse_env(&env(Some("1"), Some("41"), None), 42).expect_err("mismatch");
        assert!(
            err.to_string().contains("inherited from a parent process"),
            "{err}"
        );
    }

    #[test]
    fn listen_fds_must_be_a_small_number() {
        for fds in ["", "x", "-1", "+1", "1025", "99999999999999999999"] {
            let err = parse_env(&env(Some(fds), Some("42"), None), 42).expect_err(fds);
            assert!(
                matches!(
                    err,
                    Error::InvalidVar {
                        var: "LISTEN_FDS",
                        ..
                    }
                ),
                "{fds}: {err}"
            );
        }
    }

    #[test]
    fn one_name_per_fd() {
        let err = parse_env(&env(Some("2"), Some("42"), Some("http")), 42).expect_err("count");
        assert!(
            matches!(err, Error::NameCountMismatch { names: 1, fds: 2 }),
            "{err}"
        );
    }

    fn clear_cloexec(fd: RawFd) {
        // SAFETY: test-owned fd, open for the duration of the call.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        fcntl_setfd(fd, FdFlags::empty()).expect("F_SETFD");
    }

    fn has_cloexec(fd: &impl AsFd) -> bool {
        fcntl_getfd(fd).expect("F_GETFD").contains(FdFlags::CLOEXEC)
    }

    #[test]
    fn adopts_a_tcp_listener_and_sets_cloexec() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let fd = l.into_raw_fd();
        clear_cloexec(fd);
        let got = adopt(fd, "http".into()).expect("adopt");
        assert_eq!((got.name.as_str(), got.fd), ("http", fd));
        assert_eq!(got.socket.to_string(), addr.to_string());
        let Socket::Tcp(tcp) = &got.socket else {
            panic!("not tcp: {got:?}")
        };
        assert_eq!(tcp.as_raw_fd(), fd);
        assert!(has_cloexec(tcp));
        TcpStream::connect(addr).expect("connect");
        tcp.accept().expect("accept");
    }

    #[test]
    fn adopts_a_unix_listener() {
        let dir = std::env::temp_dir().join(format!("herd-worker-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("app.sock");
        let _ = std::fs::remove_file(&path);
        let fd = UnixListener::bind(&path).expect("bind").into_raw_fd();
        let got = adopt(fd, "sock".into()).expect("adopt");
        assert_eq!(got.socket.to_string(), format!("unix:{}", path.display()));
        assert!(got.into_unix().is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_what_is_not_a_listening_stream_socket() {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let server = TcpListener::bind("127.0.0.1:0").expect("bind");
        let stream = TcpStream::connect(server.local_addr().expect("addr")).expect("connect");
        let file = std::fs::File::open("/dev/null").expect("open");
        for (fd, what) in [
            (udp.as_raw_fd(), "a datagram socket"),
            (stream.as_raw_fd(), "not listening"),
            (file.as_raw_fd(), "not a socket"),
        ] {
            let err = adopt(fd, "x".into()).expect_err(what);
            assert!(matches!(err, Error::Unsupported { .. }), "{err}");
            assert!(err.to_string().contains(what), "{err}");
        }
        // Refused fds are left open, still owned by their caller.
        assert!(has_cloexec(&udp) && has_cloexec(&stream) && has_cloexec(&file));
    }

    #[test]
    fn refuses_an_fd_that_is_not_open() {
        let err = adopt(RawFd::MAX - 1, "http".into()).expect_err("closed");
        assert!(matches!(err, Error::FdNotOpen { .. }), "{err}");
    }

    #[test]
    fn listeners_without_activation_says_how_to_run() {
        // No test sets LISTEN_FDS: reading the real environment is safe here.
        let err = listeners().expect_err("not activated");
        assert!(matches!(err, Error::NotActivated), "{err}");
    }
}
