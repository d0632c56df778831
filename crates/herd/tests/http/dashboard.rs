//! The dashboard in a real browser (headless Chromium), and `/events` as a client reads it.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{get, start_with_http};
use crate::util::{kill, poll_until, prerequisite_missing, WAIT};

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser"].into_iter().find(|bin| {
        Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Where test artifacts (the screenshot) are kept: `target/test-artifacts/`.
fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

/// Runs headless Chromium on `url` with `args`, bounded, and returns its stdout.
fn browse(bin: &str, profile: &std::path::Path, url: &str, args: &[&str]) -> String {
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--virtual-time-budget=5000",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut out = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 60s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().expect("reader")
}

#[test]
fn the_dashboard_shows_every_worker_and_its_charts_in_chromium() {
    let Some(bin) = chromium() else {
        prerequisite_missing("chromium (Debian package chromium) for the dashboard test");
        return;
    };
    let (herd, addr) = start_with_http("app.js", "http-dash", 3, &[]);
    herd.wait_ready();
    // Two samples a slot, so every chart has a line.
    poll_until("two samples of every slot", || {
        let s: Value = serde_json::from_str(&get(addr, "/samples").body).ok()?;
        let slots = s["slots"].as_array()?;
        (slots.len() == 3
            && slots
                .iter()
                .all(|s| s["t"].as_array().is_some_and(|t| t.len() >= 2)))
        .then_some(())
    });
    let status: Value = serde_json::from_str(&get(addr, "/status").body).expect("status JSON");
    let pids: Vec<u64> = status["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["pid"].as_u64().expect("pid"))
        .collect();
    assert_eq!(pids.len(), 3, "{status}");
    let profile = crate::util::TempDir::new();
    let url = format!("http://{addr}/");
    let dom = browse(bin, profile.path(), &url, &["--dump-dom"]);
    for pid in &pids {
        assert!(
            dom.contains(&format!("<td class=\"pid\">{pid}</td>")),
            "worker {pid} is not in the page:\n{dom}"
        );
    }
    for chart in ["cpu-chart", "mem-chart"] {
        let at = dom
            .find(&format!("id=\"{chart}\""))
            .unwrap_or_else(|| panic!("no {chart}:\n{dom}"));
        let svg = &dom[at..dom[at..].find("</svg>").map_or(dom.len(), |e| at + e)];
        assert_eq!(
            svg.matches("<polyline").count(),
            3,
            "{chart} has a line per worker:\n{svg}"
        );
    }
    let shot = artifacts().join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    browse(
        bin,
        profile.path(),
        &url,
        &[&format!("--screenshot={}", shot.display())],
    );
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "screenshot {} is {size} bytes",
        shot.display()
    );
    eprintln!("dashboard screenshot: {}", shot.display());
}

#[test]
fn events_stream_worker_events_as_json() {
    let (herd, addr) = start_with_http("app.js", "http-events", 2, &[]);
    herd.wait_ready();
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(s, "GET /events HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("write");
    let mut lines = BufReader::new(s);
    let mut line = String::new();
    lines.read_line(&mut line).expect("status line");
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    // Past the head and the opening comment.
    loop {
        line.clear();
        lines.read_line(&mut line).expect("read");
        if line.starts_with(": herd events") {
            break;
        }
    }
    let spawned = herd.wait_event("instance 1's worker", |e| {
        e["event"] == "spawned" && e["instance"] == 1
    });
    let pid = spawned["pid"].as_u64().expect("pid") as u32;
    kill(pid, libc::SIGKILL);
    // exited (with its reason), then the slot's next worker spawned and ready.
    let mut seen: Vec<Value> = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !seen
        .iter()
        .any(|e| e["event"] == "ready" && e["instance"] == 1)
    {
        assert!(
            Instant::now() < deadline,
            "no ready after the kill: {seen:?}"
        );
        line.clear();
        if lines.read_line(&mut line).expect("read event") == 0 {
            panic!("the stream ended: {seen:?}");
        }
        if let Some(data) = line.strip_prefix("data: ") {
            seen.push(serde_json::from_str(data.trim_end()).expect("JSON per event"));
        }
    }
    let exited = seen
        .iter()
        .find(|e| e["event"] == "exited" && e["pid"] == pid)
        .unwrap_or_else(|| panic!("no exited for {pid}: {seen:?}"));
    assert_eq!(exited["expected"], false, "{exited}");
    assert_eq!(exited["signal"], 9, "{exited}");
    assert!(seen
        .iter()
        .any(|e| e["event"] == "spawned" && e["instance"] == 1));
}

#[test]
fn an_events_client_that_does_not_read_skips_events_instead_of_growing_herd() {
    let (herd, addr) = start_with_http("app.js", "http-lag", 1, &[]);
    herd.wait_ready();
    let port = herd.port();
    // A small receive buffer, and no reading while a thousand events happen.
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    socket.connect(&addr.into()).expect("connect");
    let mut s: TcpStream = socket.into();
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(s, "GET /events HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("write");
    let rss_before = crate::util::rss_kb(herd.pid()).expect("rss");
    // Each /hello is a `message` event (a `process.send()` from the worker).
    for _ in 0..3000 {
        let r = crate::util::get(port, "/hello").expect("/hello");
        assert_eq!(r.status, 200);
    }
    let rss_after = crate::util::rss_kb(herd.pid()).expect("rss");
    // Now read: somewhere in the stream, a `lagged` event says how many were skipped.
    let mut lines = BufReader::new(s);
    let mut line = String::new();
    let mut skipped = None;
    let deadline = Instant::now() + WAIT;
    while skipped.is_none() {
        assert!(Instant::now() < deadline, "no lagged event");
        line.clear();
        if lines.read_line(&mut line).expect("read") == 0 {
            panic!("the stream ended without a lagged event");
        }
        if line.starts_with("event: lagged") {
            line.clear();
            lines.read_line(&mut line).expect("data");
            let data: Value = serde_json::from_str(line.trim_start_matches("data: ").trim_end())
                .expect("lagged JSON");
            skipped = data["skipped"].as_u64();
        }
    }
    assert!(skipped.is_some_and(|n| n > 0), "{skipped:?}");
    let metrics = get(addr, "/metrics").body;
    assert!(
        !metrics.contains("herd_http_skipped_events_total{app=\"http-lag\"} 0.0"),
        "{metrics}"
    );
    eprintln!("skipped {skipped:?}; herd rss {rss_before} KiB → {rss_after} KiB");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "herd grew from {rss_before} KiB to {rss_after} KiB behind a client that did not read"
    );
}
