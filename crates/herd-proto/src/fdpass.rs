//! File descriptors over a unix stream socket (`SCM_RIGHTS`).
//!
//! Node's IPC code expects the fd on the *same* `sendmsg` as the line that announces it
//! (`NODE_HANDLE`), so [`send`] takes the bytes and at most one fd together. [`recv`] reads
//! bytes and whatever fds came with them; fds arrive close-on-exec (`MSG_CMSG_CLOEXEC`) so
//! they can never leak into a child, and a truncated control message (`MSG_CTRUNC`: more fds
//! than we made room for) is an error rather than a silent fd leak in the kernel's favour.
//!
//! Both calls are non-blocking when the socket is; callers integrate them with their event
//! loop (tokio's `try_io`).

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The most fds one [`recv`] accepts. A peer that sends more gets an error, not a leak.
pub const MAX_FDS_PER_READ: usize = 4;

/// Sends `bytes` (all of them or an error; a short write is reported as such) with `fd`
/// attached, if any. Returns how many bytes went out.
pub fn send(sock: impl AsFd, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<usize> {
    match fd {
        Some(fd) => send_many(sock, bytes, &[fd]),
        None => send_many(sock, bytes, &[]),
    }
}

/// [`send`] with up to [`MAX_FDS_PER_READ`] fds on one message (a receiver using [`recv`]
/// accepts that many).
pub fn send_many(sock: impl AsFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    let iov = [IoSlice::new(bytes)];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_READ))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if fds.len() > MAX_FDS_PER_READ
        || (!fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)))
    {
        return Err(io::Error::other(format!(
            "{} fds on one message; at most {MAX_FDS_PER_READ}",
            fds.len()
        )));
    }
    Ok(rustix::net::sendmsg(
        sock,
        &iov,
        &mut control,
        SendFlags::NOSIGNAL,
    )?)
}

/// Reads into `buf`, pushing any received fds onto `fds`. Returns the byte count (0 = EOF).
pub fn recv(sock: impl AsFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_READ))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::other(format!(
            "peer sent more than {MAX_FDS_PER_READ} file descriptors in one message"
        )));
    }
    Ok(msg.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn an_fd_travels_with_its_line() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let mut file = tempfile();
        file.write_all(b"payload").expect("write");
        send(&a, b"hello\n", Some(file.as_fd())).expect("send");

        let mut buf = [0u8; 64];
        let mut fds = Vec::new();
        let n = recv(&b, &mut buf, &mut fds).expect("recv");
        assert_eq!(&buf[..n], b"hello\n");
        assert_eq!(fds.len(), 1);
        let mut got = std::fs::File::from(fds.pop().expect("one fd"));
        got.rewind().expect("seek");
        let mut text = String::new();
        got.read_to_string(&mut text).expect("read");
        assert_eq!(text, "payload");
    }

    #[test]
    fn plain_bytes_need_no_fd() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        send(&a, b"x\n", None).expect("send");
        let mut buf = [0u8; 8];
        let mut fds = Vec::new();
        assert_eq!(recv(&b, &mut buf, &mut fds).expect("recv"), 2);
        assert!(fds.is_empty());
        drop(a);
        assert_eq!(recv(&b, &mut buf, &mut fds).expect("eof"), 0);
    }

    fn tempfile() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("herd-fdpass-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .expect("tempfile");
        let _ = std::fs::remove_file(&path);
        file
    }
}
