//! Reloads under keep-alive load with a stock Node app: herd's drain (loaded into Node
//! workers) makes a stopping worker answer `Connection: close` and close idle sockets only
//! after a grace, so clients that keep their connections open lose no request.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::support::{cli, home_of, ready_pids, settled, wait_status};
use crate::util::{fixture, wait_requests, Herd, WAIT};

/// Sets the flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

const INSTANCES: usize = 2;
const RELOADS: usize = 3;
const CLIENTS: usize = 4;

/// One response on a keep-alive connection: whether the server said it closes.
fn exchange(reader: &mut BufReader<TcpStream>) -> std::io::Result<bool> {
    reader
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: herd\r\n\r\n")?;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("status line {line:?}")));
    }
    let (mut length, mut close) = (None, false);
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("closed inside the headers"));
        }
        let header = line.trim_end().to_ascii_lowercase();
        if header.is_empty() {
            break;
        }
        if let Some(v) = header.strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        }
        if header == "connection: close" {
            close = true;
        }
    }
    let mut body = vec![0; length.ok_or_else(|| std::io::Error::other("no content-length"))?];
    reader.read_exact(&mut body)?;
    Ok(close)
}

fn connect(port: u16) -> std::io::Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(BufReader::new(stream))
}

#[test]
fn keepalive_clients_lose_nothing_when_a_stock_node_app_is_reloaded() {
    let name = "ka-stock";
    let app = fixture("control_stock.js");
    let n = INSTANCES.to_string();
    let herd = Herd::start(&["-i", &n, "-e", "PORT=0", "--name", name, &app]);
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);
    let first = wait_status(&home, name, "every worker ready", |s| settled(s, INSTANCES));
    let mut pids = ready_pids(&first);

    let stop = Arc::new(AtomicBool::new(false));
    // Stops the client threads however the test ends (a failed assert included).
    let _stop_clients = StopOnDrop(Arc::clone(&stop));
    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
            thread::spawn(move || {
                let mut failures = Vec::new();
                let deadline = Instant::now() + WAIT * 2;
                let mut conn = connect(port).expect("first connection");
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match exchange(&mut conn) {
                        Ok(closing) => {
                            done.fetch_add(1, Ordering::Relaxed);
                            if closing {
                                conn = match connect(port) {
                                    Ok(c) => c,
                                    Err(e) => {
                                        failures.push(format!("reconnect: {e}"));
                                        break;
                                    }
                                };
                            }
                        }
                        Err(e) => {
                            // The server cut a keep-alive connection it had not announced
                            // closing: the request on it is lost.
                            failures.push(e.to_string());
                            match connect(port) {
                                Ok(c) => conn = c,
                                Err(e) => {
                                    failures.push(format!("reconnect: {e}"));
                                    break;
                                }
                            }
                        }
                    }
                }
                failures
            })
        })
        .collect();

    let wait_requests = |n: usize| {
        wait_requests("the keep-alive clients", n, WAIT, || {
            done.load(Ordering::Relaxed)
        })
    };
    wait_requests(200);
    for round in 1..=RELOADS {
        let out = cli(&home, &["reload", name]);
        assert_eq!(out.code, Some(0), "reload {round}\n{out}\n{}", herd.dump());
        let now = ready_pids(&wait_status(&home, name, "reloaded", |s| {
            settled(s, INSTANCES)
        }));
        assert!(
            now.is_disjoint(&pids),
            "reload {round} replaced every worker"
        );
        pids = now;
        let before = done.load(Ordering::Relaxed);
        wait_requests(before + 200);
    }
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client thread"))
        .collect();
    let total = done.load(Ordering::Relaxed);
    eprintln!(
        "{total} keep-alive requests across {RELOADS} reloads, {} failed",
        failures.len()
    );
    assert!(total >= 800, "the clients ran: {total} requests");
    assert!(
        failures.is_empty(),
        "requests lost on keep-alive connections: {failures:?}\n{}",
        herd.dump()
    );
}
