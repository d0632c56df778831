//! `--http`: metrics (promtool, values that move when workers die or hang), `/ready` and
//! `/live` (also during `--drain-delay`), the token and host rules, the bounds on clients,
//! `/events`, and the dashboard in headless Chromium.

mod access;
mod dashboard;
mod metrics;
mod ready;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::util::{start_named_node, Herd};

/// A reply from herd's HTTP server.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// `herd run … --http 127.0.0.1:0 EXTRA… fixtures/APP` (Node, `PORT=0`) and the address the
/// HTTP server got, from its `http` event.
pub fn start_with_http(
    app: &str,
    name: &str,
    instances: usize,
    extra: &[&str],
) -> (Herd, SocketAddr) {
    let mut args = vec!["--http", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let herd = start_named_node(app, name, instances, &args);
    let addr = http_addr(&herd);
    (herd, addr)
}

/// The address in herd's `http` event.
pub fn http_addr(herd: &Herd) -> SocketAddr {
    let event = herd.wait_named("http");
    event["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {event}"))
}

/// `GET path` with extra header lines (`Name: value`), one request per connection.
pub fn request(addr: SocketAddr, path: &str, headers: &[&str]) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.set_write_timeout(Some(Duration::from_secs(20)))?;
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("no head in {text:?}"),
        )
    })?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok(Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

/// `GET path`, which must answer.
pub fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, path, &[]).unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}

/// The value of the sample whose name and labels are `series` exactly
/// (`herd_worker_up{app="a",instance="0",worker_id="1"}`), in a /metrics text.
pub fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (name, v) = l.rsplit_once(' ')?;
        (name == series).then(|| v.parse().ok()).flatten()
    })
}

/// Every sample of metric `name` whose labels include `label` (`instance="0"`).
pub fn samples<'a>(metrics: &'a str, name: &str, label: &str) -> Vec<(&'a str, f64)> {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            Some((series, v.parse().ok()?))
        })
        .collect()
}
