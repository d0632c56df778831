//! Probing one worker over HTTP, and the per-worker jitter of the recycling limits.
//!
//! A probe must reach *that* worker, not whichever one the kernel or the balancer picks:
//!
//! - Node workers (every balancing mode): herd makes a loopback TCP connection only it can
//!   make ([`private_pair`]) and hands the server side of it to the worker as a `newconn`,
//!   so the app's server sees an ordinary connection. herd speaks HTTP on the client side.
//! - Socket-activation workers: each gets one more listening socket, named `health` in
//!   `LISTEN_FDNAMES` (after the app's own), bound to `127.0.0.1:0` for that worker alone.
//!   The program must serve HTTP on it too; `herd-worker`'s `listeners()` returns it like
//!   the others, and servers that serve every inherited socket need nothing more.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// GETs `path` and returns the status code, or why there is none by `deadline`.
pub async fn probe(stream: TcpStream, path: &str, deadline: Instant) -> Result<u16, String> {
    let started = Instant::now();
    match tokio::time::timeout_at(deadline, exchange(stream, path)).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer within {}",
            crate::fmt::human(deadline.saturating_duration_since(started))
        )),
    }
}

/// Both ends of a probe connection, and when the probe must be done.
#[derive(Debug)]
pub struct ProbeConn {
    pub client: TcpStream,
    /// The server end, for the worker.
    pub served: OwnedFd,
    pub deadline: Instant,
}

/// Connections a probe listener accepts and drops before giving up on its own.
const STRANGERS_MAX: usize = 16;

/// A loopback TCP connection that only herd can have made, without blocking.
///
/// A fresh listener on `127.0.0.1:0` (backlog 1) lives only until herd's own connection
/// arrives: herd binds its client first, so it knows the client's address, and accepts
/// until the peer is exactly that address (the 4-tuple: this listener, that client).
/// Anything else that got in is closed unread. The listener is closed as soon as the pair
/// exists, so there is nothing for others to find, fill or wait on between probes.
pub async fn private_pair(deadline: Instant) -> io::Result<ProbeConn> {
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let listener = tokio::net::TcpSocket::new_v4()?;
    listener.bind(loopback)?;
    let listener = listener.listen(1)?;
    let target = listener.local_addr()?;
    let client = tokio::net::TcpSocket::new_v4()?;
    client.bind(loopback)?;
    let mine = client.local_addr()?;
    let client = client.connect(target).await?;
    for _ in 0..STRANGERS_MAX {
        let (conn, peer) = listener.accept().await?;
        if peer == mine {
            drop(listener);
            let served = conn.into_std()?;
            return Ok(ProbeConn {
                client,
                served: served.into(),
                deadline,
            });
        }
        // Someone else's connection: close it, never serve it.
        drop(conn);
    }
    Err(io::Error::other(format!(
        "{STRANGERS_MAX} other connections reached the probe's listener first"
    )))
}

async fn exchange(mut stream: TcpStream, path: &str) -> Result<u16, String> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: herd-health\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending the probe: {e}"))?;
    let mut buf = [0u8; 256];
    let mut filled = 0;
    while filled < buf.len() {
        let n = stream
            .read(&mut buf[filled..])
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 {
            break;
        }
        filled += n;
        if buf[..filled].windows(2).any(|w| w == b"\r\n") {
            break;
        }
    }
    parse_status(&buf[..filled])
}

/// The status code of an HTTP/1.x status line.
pub fn parse_status(head: &[u8]) -> Result<u16, String> {
    let line = head
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or_default();
    let text = String::from_utf8_lossy(line);
    let mut parts = text.split_ascii_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|c| c.parse::<u16>().ok()),
    ) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => Ok(code),
        _ if head.is_empty() => Err("connection closed without an answer".into()),
        _ => Err(format!(
            "not an HTTP answer: {:?}",
            text.chars().take(40).collect::<String>()
        )),
    }
}

/// A per-worker amount in `0..=max`, so that limits with jitter do not recycle every worker
/// at once. Derived from the worker id: stable for a worker, different across workers.
pub fn jitter(worker_id: u64, max: u64) -> u64 {
    if max == 0 {
        return 0;
    }
    crate::mix::mix64(worker_id) % (max + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_pairs_are_matched_end_to_end() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let deadline = Instant::now() + std::time::Duration::from_secs(5);
            let pair = private_pair(deadline).await.expect("pair");
            let served = std::net::TcpStream::from(pair.served);
            assert_eq!(
                served.peer_addr().expect("peer"),
                pair.client.local_addr().expect("local")
            );
            assert_eq!(
                served.local_addr().expect("local"),
                pair.client.peer_addr().expect("peer")
            );
        });
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Ok(200));
        assert_eq!(
            parse_status(b"HTTP/1.0 503 Service Unavailable\r\nx"),
            Ok(503)
        );
        assert!(parse_status(b"").unwrap_err().contains("without an answer"));
        assert!(parse_status(b"SSH-2.0-OpenSSH")
            .unwrap_err()
            .contains("not an HTTP"));
    }

    #[test]
    fn jitter_stays_in_range_and_varies() {
        let values: Vec<u64> = (1..=50).map(|id| jitter(id, 10)).collect();
        assert!(values.iter().all(|&v| v <= 10));
        assert!(
            values
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 5
        );
        assert_eq!(jitter(7, 0), 0);
    }
}
