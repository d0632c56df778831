//! Sending notify datagrams to `NOTIFY_SOCKET` (`sd_notify(3)`), and the watchdog period.
//!
//! Each call opens an unbound unix datagram socket, sends one datagram and closes it, as
//! libsystemd does: there is no connection to keep, and a supervisor that restarts gets the
//! next message at the same address. A send waits at most [`SEND_TIMEOUT`] when the
//! supervisor's queue is full, so a busy supervisor slows a worker down but cannot hang it.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::thread::JoinHandle;
use std::time::Duration;

use herd_proto::notify::{encode, Message};

use crate::Error;

/// Longest a send waits for room in the supervisor's queue.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends `messages` as one datagram to `NOTIFY_SOCKET`.
///
/// Returns `Ok(false)` without doing anything when `NOTIFY_SOCKET` is not set (or empty): the
/// program runs without a supervisor that listens. `Ok(true)` when the datagram was sent.
pub fn notify(messages: &[Message]) -> Result<bool, Error> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) if !socket.is_empty() => send_to(&socket, messages).map(|()| true),
        _ => Ok(false),
    }
}

/// `READY=1`: this worker accepts connections. Send it once it listens.
pub fn notify_ready() -> Result<bool, Error> {
    notify(&[Message::Ready])
}

/// `STATUS=text`: a one-line status shown by `herd status` (newlines become spaces).
pub fn notify_status(text: &str) -> Result<bool, Error> {
    notify(&[Message::Status(text.to_owned())])
}

/// `WATCHDOG=1`: this worker is alive. Send it every [`watchdog_interval`].
pub fn notify_watchdog() -> Result<bool, Error> {
    notify(&[Message::Watchdog])
}

/// `STOPPING=1`: this worker is shutting down on its own.
pub fn notify_stopping() -> Result<bool, Error> {
    notify(&[Message::Stopping])
}

/// How long the supervisor waits for a `WATCHDOG=1` before it treats the worker as hung:
/// `WATCHDOG_USEC` (microseconds). `None` when it is not set, or when `WATCHDOG_PID` is set
/// to another process (the variables were inherited, as with `LISTEN_PID`).
pub fn watchdog_timeout() -> Result<Option<Duration>, Error> {
    let pid = std::env::var_os("WATCHDOG_PID");
    let usec = std::env::var_os("WATCHDOG_USEC");
    parse_watchdog(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// How often to send [`notify_watchdog`]: half of [`watchdog_timeout`], as systemd advises,
/// so one late ping is not yet a hang.
pub fn watchdog_interval() -> Result<Option<Duration>, Error> {
    Ok(watchdog_timeout()?.map(|timeout| timeout / 2))
}

/// Starts a thread that sends `WATCHDOG=1` every [`watchdog_interval`], when the watchdog is
/// on and `NOTIFY_SOCKET` is set (otherwise returns `Ok(None)` and starts nothing).
///
/// The thread runs until a send fails and returns that error. It proves only that the
/// process is alive: a worker whose event loop is stuck keeps pinging. To let the watchdog
/// catch a stuck loop, call [`notify_watchdog`] from a timer in that loop instead.
pub fn spawn_watchdog_thread() -> Result<Option<JoinHandle<Error>>, Error> {
    let Some(every) = watchdog_interval()? else {
        return Ok(None);
    };
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let thread = std::thread::Builder::new()
        .name("herd-watchdog".into())
        .spawn(move || loop {
            if let Err(e) = send_to(&socket, &[Message::Watchdog]) {
                return e;
            }
            std::thread::sleep(every);
        })
        .map_err(|source| Error::Notify {
            socket: "(watchdog thread)".into(),
            datagram: "WATCHDOG=1".into(),
            source,
        })?;
    Ok(Some(thread))
}

pub(crate) fn parse_watchdog(
    usec: Option<&OsStr>,
    pid: Option<&OsStr>,
    my_pid: u32,
) -> Result<Option<Duration>, Error> {
    let Some(usec) = usec else { return Ok(None) };
    if let Some(pid) = pid {
        if pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(my_pid) {
            return Ok(None);
        }
    }
    let text = usec.to_string_lossy();
    match text.parse::<u64>() {
        Ok(n) if n > 0 && text.bytes().all(|b| b.is_ascii_digit()) => {
            Ok(Some(Duration::from_micros(n)))
        }
        _ => Err(Error::InvalidVar {
            var: "WATCHDOG_USEC",
            value: text.into_owned(),
            expected: "a positive number of microseconds",
        }),
    }
}

/// Sends one datagram to `socket`: a path, or an abstract name when it starts with `@`.
pub(crate) fn send_to(socket: &OsStr, messages: &[Message]) -> Result<(), Error> {
    let datagram = encode(messages)?;
    let fail = |source| Error::Notify {
        socket: socket.to_string_lossy().into_owned(),
        datagram: datagram.clone(),
        source,
    };
    let addr = address(socket).map_err(fail)?;
    let sock = UnixDatagram::unbound().map_err(fail)?;
    sock.set_write_timeout(Some(SEND_TIMEOUT)).map_err(fail)?;
    sock.send_to_addr(datagram.as_bytes(), &addr)
        .map_err(fail)?;
    Ok(())
}

fn address(socket: &OsStr) -> std::io::Result<SocketAddr> {
    match socket.as_bytes().strip_prefix(b"@") {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        Some(name) => <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name),
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        Some(_) => Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "abstract unix socket names exist only on Linux",
        )),
        None => SocketAddr::from_pathname(OsString::from(socket)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_proto::notify::parse;

    fn temp_socket(tag: &str) -> (UnixDatagram, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("herd-worker-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        (UnixDatagram::bind(&path).expect("bind"), dir)
    }

    fn receive(sock: &UnixDatagram) -> Vec<Message> {
        let mut buf = [0u8; herd_proto::notify::MAX_DATAGRAM + 1];
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let n = sock.recv(&mut buf).expect("recv");
        parse(&buf[..n]).expect("bounded").messages
    }

    #[test]
    fn sends_a_datagram_to_a_path() {
        let (sock, dir) = temp_socket("path");
        let path = dir.join("notify.sock");
        send_to(
            path.as_os_str(),
            &[Message::Ready, Message::Status("up".into())],
        )
        .expect("send");
        assert_eq!(
            receive(&sock),
            vec![Message::Ready, Message::Status("up".into())]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_name() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("herd-worker-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let sock = UnixDatagram::bind_addr(&addr).expect("bind");
        send_to(OsStr::new(&format!("@{name}")), &[Message::Watchdog]).expect("send");
        assert_eq!(receive(&sock), vec![Message::Watchdog]);
    }

    #[test]
    fn a_missing_socket_is_an_error_that_names_it() {
        let err = send_to(OsStr::new("/nonexistent/herd.sock"), &[Message::Ready])
            .expect_err("no such socket");
        let text = err.to_string();
        assert!(
            text.contains("/nonexistent/herd.sock") && text.contains("READY=1"),
            "{text}"
        );
    }

    #[test]
    fn oversized_status_is_refused_before_sending() {
        let status = Message::Status("x".repeat(herd_proto::notify::MAX_DATAGRAM));
        let err = send_to(OsStr::new("/nonexistent"), &[status]).expect_err("too large");
        assert!(matches!(err, Error::NotifyTooLarge(_)), "{err}");
    }

    #[test]
    fn notify_reads_notify_socket_from_the_environment() {
        // The only test that touches NOTIFY_SOCKET, so the two halves cannot race.
        std::env::remove_var("NOTIFY_SOCKET");
        assert!(!notify_ready().expect("no-op"));
        let (sock, dir) = temp_socket("env");
        std::env::set_var("NOTIFY_SOCKET", dir.join("notify.sock"));
        let sent = notify_status("two\nlines");
        std::env::remove_var("NOTIFY_SOCKET");
        assert!(sent.expect("sent"));
        assert_eq!(receive(&sock), vec![Message::Status("two lines".into())]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn watchdog_period_comes_from_watchdog_usec() {
        let usec = Some(OsStr::new("3000000"));
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(parse_watchdog(usec, None, 7).expect("valid"), secs(3));
        assert_eq!(
            parse_watchdog(usec, Some(OsStr::new("7")), 7).expect("valid"),
            secs(3)
        );
        assert_eq!(
            parse_watchdog(usec, Some(OsStr::new("8")), 7).expect("other pid"),
            None
        );
        assert_eq!(parse_watchdog(None, None, 7).expect("unset"), None);
        for bad in ["0", "", "1.5", "-1", "+5", "5s"] {
            let err = parse_watchdog(Some(OsStr::new(bad)), None, 7).expect_err(bad);
            assert!(
                matches!(
                    err,
                    Error::InvalidVar {
                        var: "WATCHDOG_USEC",
                        ..
                    }
                ),
                "{bad}"
            );
        }
    }
}
