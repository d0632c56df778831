//! Servers written for systemd socket activation, as they are (issue #11): a plain blocking
//! `accept()` loop, and responses written in two pieces on keep-alive connections
//! (`fixtures/compat_naive.py`); and the CLI's output items of issue #11 item 7.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{cli, fixture, home_of, Herd, TempDir, WAIT};

fn start_naive(instances: usize) -> Herd {
    let app = fixture("compat_naive.py");
    let n = instances.to_string();
    Herd::start(&[
        "-i",
        &n,
        "--listen",
        "127.0.0.1:0",
        "--ready",
        "notify",
        "--name",
        "compat-naive",
        &app,
    ])
}

/// One request on a keep-alive connection: the parsed JSON body.
fn request(reader: &mut BufReader<TcpStream>) -> Value {
    reader
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send request");
    let mut length = None;
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("read header line");
        assert!(n > 0, "connection closed mid-response");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = Some(v.trim().parse::<usize>().expect("content-length"));
        }
    }
    let mut body = vec![0; length.expect("a content-length")];
    reader.read_exact(&mut body).expect("read body");
    serde_json::from_slice(&body).expect("JSON body")
}

fn connect(port: u16) -> BufReader<TcpStream> {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream.set_nodelay(true).expect("client nodelay");
    BufReader::new(stream)
}

/// Issue #11 item 4: herd's TCP listeners carry TCP_NODELAY, which accepted connections
/// inherit, so a server that never sets it (uvicorn `--fd 3`, a plain loop) does not wait
/// ~40 ms for the client's delayed ACK before the second write of every response.
#[test]
fn keep_alive_responses_written_in_two_pieces_are_not_held_by_nagle() {
    let mut herd = start_naive(1);
    herd.wait_ready();
    let mut conn = connect(herd.port());
    let first = request(&mut conn);
    let mut took = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        request(&mut conn);
        took.push(t.elapsed());
    }
    took.sort();
    let median = took[took.len() / 2];
    assert!(
        median < Duration::from_millis(20),
        "median keep-alive request took {median:?} (Nagle + delayed ACK: ~40 ms): {took:?}"
    );
    assert_eq!(
        first["nodelay"], true,
        "the accepted connection inherits TCP_NODELAY: {first}"
    );
    drop(conn);
    herd.stop();
}

/// Issue #11 item 6: fd 3 is blocking, as systemd passes it, so a loop that calls `accept()`
/// without select() waits for the next connection instead of dying with EAGAIN.
#[test]
fn a_plain_blocking_accept_loop_serves_and_stays_up() {
    let mut herd = start_naive(2);
    herd.wait_ready();
    let port = herd.port();
    // Bounded: 20 requests on fresh connections, 50 ms apart (both workers wait in accept).
    for _ in 0..20 {
        let mut conn = connect(port);
        let r = request(&mut conn);
        assert_eq!(r["nonblock_at_start"], false, "fd 3 is blocking: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let exits: Vec<Value> = herd
        .events()
        .into_iter()
        .filter(|e| e["event"] == "exited")
        .collect();
    assert!(
        exits.is_empty(),
        "no worker may exit: {exits:?}\n{}",
        herd.dump()
    );
    herd.stop();
    herd.assert_no_worker_left();
}

/// Issue #11 item 7: a missing argument is named, with the usage, on the one error line.
#[test]
fn a_missing_argument_is_named_with_the_usage() {
    let home = TempDir::new();
    for (args, missing, usage) in [
        (&["run"][..], "<APP>", "usage: herd run"),
        (&["reload"][..], "<NAME>", "usage: herd reload <NAME>"),
    ] {
        let out = cli(home.path(), args);
        assert_eq!(out.code, Some(2), "{out}");
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {out}");
        assert!(
            lines[0].starts_with("error: ")
                && lines[0].contains(missing)
                && lines[0].contains(usage),
            "{args:?}: {out}"
        );
    }
}

/// Issue #11 item 7: the text log says "restarting in …" once per crash (it said it twice),
/// and `herd ls` tells restarts by reload apart from crashes.
#[test]
fn a_crash_is_told_once_and_ls_names_why_workers_restarted() {
    let home = TempDir::new();
    let app = fixture("exit3.sh");
    let out = cli(
        home.path(),
        &[
            "run",
            "--log-format",
            "text",
            "-i",
            "1",
            "--restart-delay",
            "10ms",
            "--max-restarts",
            "2",
            "--",
            "sh",
            &app,
        ],
    );
    assert_eq!(out.code, Some(1), "{out}");
    let told = out.stdout.matches("restarting in").count();
    assert_eq!(told, 2, "2 restarts, each told once:\n{out}");

    let mut herd = start_naive(2);
    herd.wait_ready();
    let home = home_of(&herd);
    cli(&home, &["reload", "compat-naive"]).assert_ok();
    let ls = cli(&home, &["ls"]);
    ls.assert_ok();
    let row = ls
        .stdout
        .lines()
        .find(|l| l.contains("compat-naive"))
        .unwrap_or_else(|| panic!("no row\n{ls}"));
    assert!(row.contains("2 (reload 2)"), "{row}");
    herd.stop();
    herd.assert_no_worker_left();
}

/// fd 3 is made blocking once, before the first worker gets it, and never again: a worker
/// that made it non-blocking (every async server does, for all the app's workers) keeps it so
/// when herd starts another worker — set back to blocking, a running async worker's accept()
/// could block its event loop.
#[test]
fn herd_sets_fd_3_blocking_once_and_leaves_it_to_the_workers_after() {
    let app = fixture("compat_naive.py");
    let mut herd = Herd::start(&[
        "-i",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--ready",
        "notify",
        "--name",
        "compat-async",
        "-e",
        "ASYNC=1",
        &app,
    ]);
    herd.wait_ready();
    let port = herd.port();
    let first = request(&mut connect(port));
    assert_eq!(first["nonblock_at_start"], false, "{first}");
    let pid = first["pid"].as_u64().expect("pid") as u32;
    let mark = herd.mark();
    crate::util::kill(pid, libc::SIGKILL);
    herd.wait_event_after("the replacement's ready", mark, |e| e["event"] == "ready");
    let second = request(&mut connect(port));
    assert_ne!(second["pid"], first["pid"], "{second}");
    assert_eq!(
        second["nonblock_at_start"], true,
        "left as the first worker made it: {second}"
    );
    herd.stop();
    herd.assert_no_worker_left();
}
