//! Hardening: herd's own output. Each test plays an attacker of herd's stdout: a reader that
//! stops reading while a worker floods, workers that print huge lines and send huge
//! messages, workers that print terminal escapes, and a huge log file behind `herd start`.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, ChildStdout};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{
    cli, cli_command, fixture, get, poll_until, port_of, spawn_cli, wait_status, workers, TempDir,
    WAIT,
};

/// The longest line herd may write: 16 KiB (`MAX_LINE`) plus room for the prefix or JSON
/// envelope and the cut marker.
const CAP: usize = 17 * 1024;

/// A `herd run` of the hostile fixture, with its stdout left to the test. Dropping it stops
/// herd (SIGTERM, then SIGKILL) and kills every worker process group it started.
struct Supervised {
    child: Child,
    stdout: Option<ChildStdout>,
    exited: bool,
}

impl Supervised {
    fn spawn(home: &Path, format: &str, name: &str, instances: usize, extra: &[&str]) -> Self {
        let app = fixture("output_hostile.js");
        let n = instances.to_string();
        let mut args = vec![
            "run",
            "--log-format",
            format,
            "-i",
            &n,
            "-e",
            "PORT=0",
            "--name",
            name,
        ];
        args.extend_from_slice(extra);
        args.push(&app);
        let mut child = cli_command(home, &args).spawn().expect("start herd");
        let stdout = child.stdout.take();
        let mut stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            // Drained and thrown away: only stdout is under test.
            let mut buf = [0u8; 4096];
            while matches!(stderr.read(&mut buf), Ok(n) if n > 0) {}
        });
        Supervised {
            child,
            stdout,
            exited: false,
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Reads every stdout line into a shared list from a thread.
    fn collect(&mut self) -> Lines {
        let lines: Lines = Arc::default();
        let stdout = self.stdout.take().expect("stdout not taken yet");
        let shared = Arc::clone(&lines);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            loop {
                let mut line = Vec::new();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if line.last() == Some(&b'\n') {
                    line.pop();
                }
                let mut all = shared.lock().unwrap_or_else(|e| e.into_inner());
                // Every event; worker lines only up to a bound.
                if all.len() < 20_000 || !contains(&line, r#""line":"#) {
                    all.push(line);
                }
            }
        });
        lines
    }

    /// Waits up to `bound` for herd to exit.
    fn wait_exit(&mut self, bound: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = true;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        // Workers are herd's children and each leads its own process group.
        let workers = children_of(self.child.id());
        if !self.exited {
            self.signal(libc::SIGTERM);
            if self.wait_exit(Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        for pid in workers {
            let pid = pid as i32;
            // SAFETY: getpgid and kill on a pid that was herd's child.
            unsafe {
                if libc::getpgid(pid) == pid {
                    libc::kill(-pid, libc::SIGKILL);
                }
            }
        }
    }
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

type Lines = Arc<Mutex<Vec<Vec<u8>>>>;

fn snapshot(lines: &Lines) -> Vec<Vec<u8>> {
    lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Waits for a stdout line that `pred` accepts and returns it.
fn wait_raw(lines: &Lines, what: &str, pred: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    poll_until(what, || snapshot(lines).into_iter().find(|l| pred(l)))
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn show(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let head: String = text.chars().take(200).collect();
    format!("{head:?}… ({} bytes)", line.len())
}

/// Every byte a terminal could act on: C0 controls but tab, DEL, and C1 controls (UTF-8
/// `C2 80`–`C2 9F`). `allow_newline` for multi-line output such as a table.
fn terminal_controls(bytes: &[u8], allow_newline: bool) -> Vec<String> {
    let mut found = Vec::new();
    for (i, &b) in bytes.iter().enumerate() {
        let c0 = (b < 0x20 && b != b'\t' && !(allow_newline && b == b'\n')) || b == 0x7f;
        let c1 = b == 0xc2 && bytes.get(i + 1).is_some_and(|n| (0x80..=0x9f).contains(n));
        if c0 || c1 {
            let from = i.saturating_sub(20);
            let to = (i + 20).min(bytes.len());
            found.push(format!(
                "byte {b:#04x} at {i} in {:?}",
                String::from_utf8_lossy(&bytes[from..to])
            ));
        }
    }
    found
}

fn assert_capped(lines: &[Vec<u8>]) {
    for (i, line) in lines.iter().enumerate() {
        assert!(
            line.len() <= CAP,
            "stdout line {i} is longer than {CAP} bytes: {}",
            show(line)
        );
    }
}

/// Waits (in JSON) for every slot to be ready; the first `bound` port.
fn json_ready(lines: &Lines) -> u16 {
    wait_raw(lines, "all_ready", |l| {
        contains(l, r#""event":"all_ready""#)
    });
    let bound = wait_raw(lines, "bound", |l| contains(l, r#""event":"bound""#));
    port_of(&serde_json::from_slice::<Value>(&bound).expect("bound is JSON"))
}

/// Waits (via `herd status --json`) for `n` ready workers; the app's port.
fn status_ready(home: &Path, name: &str, n: usize) -> u16 {
    let socket = home.join(format!("{name}.sock"));
    poll_until("the control socket", || socket.exists().then_some(()));
    let s = wait_status(home, name, "every worker ready", |s| {
        s["ready"] == n && s["listen"].as_array().is_some_and(|l| !l.is_empty())
    });
    let addr = s["listen"][0].as_str().expect("listen address");
    port_of(&serde_json::json!({ "address": addr }))
}

/// Whether the pipe behind `stdout` holds (nearly) as much as it can: its writer blocks.
fn pipe_is_full(stdout: &impl AsRawFd) -> bool {
    let fd = stdout.as_raw_fd();
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int; F_GETPIPE_SZ reads nothing. Both on our own pipe.
    let (size, rc) = unsafe {
        (
            libc::fcntl(fd, libc::F_GETPIPE_SZ),
            libc::ioctl(fd, libc::FIONREAD, &mut queued),
        )
    };
    // A pipe holds `size` bytes in page-sized slots; lines do not fill every slot to the
    // byte, so "full" is most of it.
    rc == 0 && size > 0 && queued >= size / 4 * 3
}

/// (a) `herd run | less`, paused: herd's stdout is a pipe nobody reads while both workers
/// flood. Before the fix herd blocked in write(2): the first request through herd's
/// round-robin routing timed out, and neither `herd status` nor SIGTERM got an answer.
#[test]
fn a_blocked_stdout_stops_neither_routing_nor_control_nor_sigterm() {
    let home = TempDir::new();
    let name = "out-blocked";
    let mut herd = Supervised::spawn(home.path(), "json", name, 2, &["--kill-timeout", "2s"]);
    let mut out = BufReader::new(herd.stdout.take().expect("stdout"));
    // Read until every worker is ready, then never again (for now).
    let mut port = None;
    loop {
        let mut line = String::new();
        let n = out.read_line(&mut line).expect("herd's stdout");
        assert!(n > 0, "herd exited before it was ready");
        let event: Value = serde_json::from_str(line.trim_end()).expect("a JSON line");
        if event["event"] == "bound" && port.is_none() {
            port = Some(port_of(&event));
        }
        if event["event"] == "all_ready" {
            break;
        }
    }
    let port = port.expect("a bound event before all_ready");
    for _ in 0..2 {
        // Round-robin: one request each.
        get(port, "/flood").expect("/flood");
    }
    poll_until("herd's stdout pipe to fill up", || {
        pipe_is_full(out.get_ref()).then_some(())
    });

    // Routing: keep making requests for 5 s (long enough for herd to give up on its stdout,
    // after 2 s without progress, and drop lines), each answered within a bound.
    let started = Instant::now();
    let mut served = 0;
    while served < 20 || started.elapsed() < Duration::from_secs(5) {
        assert!(served < 10_000, "bounded load loop");
        let t = Instant::now();
        let r = get(port, "/")
            .unwrap_or_else(|e| panic!("request {served} with herd's stdout blocked: {e}"));
        assert_eq!(r.status, 200);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "request {served} took {:?}",
            t.elapsed()
        );
        served += 1;
    }
    // Control: status and logs (the ring does not depend on stdout) answer.
    let status = spawn_cli(home.path(), &["status", name]).finish(Duration::from_secs(10));
    status.assert_ok();
    let logs = spawn_cli(home.path(), &["logs", name, "-n", "3"]).finish(Duration::from_secs(10));
    logs.assert_ok();
    assert!(logs.stdout.contains("flood"), "{logs}");

    // The reader comes back: herd says how many lines it dropped.
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut line = String::new();
        loop {
            line.clear();
            match out.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            if line.contains(r#""event":"log_dropped""#) {
                let _ = tx.send(line.clone());
                return Some(out);
            }
        }
    });
    let notice = rx
        .recv_timeout(WAIT)
        .expect("a log_dropped event once stdout is read again");
    let out = reader.join().expect("reader").expect("the reader back");
    let notice: Value = serde_json::from_str(notice.trim_end()).expect("JSON");
    assert!(notice["lines"].as_u64().is_some_and(|n| n > 0), "{notice}");
    assert!(
        notice["message"]
            .as_str()
            .is_some_and(|m| m.contains("log lines dropped (stdout was blocked)")),
        "{notice}"
    );

    // Blocked again, then SIGTERM: herd stops its workers and exits within a bound, without
    // waiting for a reader that never comes.
    poll_until("herd's stdout pipe to fill up again", || {
        pipe_is_full(out.get_ref()).then_some(())
    });
    let t = Instant::now();
    herd.signal(libc::SIGTERM);
    let status = herd.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some(),
        "herd did not exit within 20 s of SIGTERM with its stdout blocked"
    );
    eprintln!("herd exited {:?} after SIGTERM", t.elapsed());
}

/// A worker that floods output must not starve the runtime thread: herd reads its pipe as
/// fast as it can, and before the fix one chunk's lines went out without ever yielding, so
/// SIGTERM was seen 2 s late and the 2 s `--kill-timeout` fired after 5-11 s.
#[test]
fn a_flooding_worker_does_not_starve_signals_or_timers() {
    let home = TempDir::new();
    let name = "out-starve";
    let mut herd = Supervised::spawn(home.path(), "json", name, 2, &["--kill-timeout", "2s"]);
    let lines = herd.collect();
    let port = json_ready(&lines);
    for _ in 0..2 {
        get(port, "/flood").expect("/flood");
    }
    wait_raw(&lines, "the flood", |l| contains(l, "flood yyyy"));
    let before = std::time::SystemTime::now();
    herd.signal(libc::SIGTERM);
    let status = herd.wait_exit(WAIT);
    assert!(status.is_some(), "herd did not exit after SIGTERM");
    let all = snapshot(&lines);
    let event = |name: &str| -> Value {
        let tag = format!(r#""event":"{name}""#);
        let line = all
            .iter()
            .find(|l| contains(l, &tag))
            .unwrap_or_else(|| panic!("no {name} event"));
        serde_json::from_slice(line).expect("JSON")
    };
    let ms = |e: &Value| -> i64 {
        let ts = e["ts"].as_str().expect("ts");
        // `…T14:32:50.846Z`: milliseconds of the day (the test does not run over midnight).
        let time = &ts[ts.len() - 13..ts.len() - 1];
        let parts: Vec<f64> = time.split(':').map(|p| p.parse().expect("ts")).collect();
        ((parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]) * 1000.0) as i64
    };
    let stopping = event("stopping");
    let kill = event("kill");
    let sent = before
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
        % 86_400_000;
    let seen_after = ms(&stopping) - sent;
    let kill_after = ms(&kill) - ms(&stopping);
    eprintln!("SIGTERM seen after {seen_after} ms; --kill-timeout 2s fired after {kill_after} ms");
    assert!(seen_after < 1000, "SIGTERM was seen {seen_after} ms late");
    assert!(
        kill_after < 4000,
        "the 2 s --kill-timeout fired after {kill_after} ms"
    );
}

/// (b) JSON: a worker prints a 1 MB line of control bytes (6 MB once JSON-escaped) and sends
/// a 500 KB message and a 500 KB broadcast. Before the fix the `message` and `broadcast`
/// events carried the whole payload (one stdout line of ~500 KB) and the escaped line was
/// 96 KiB.
#[test]
fn huge_lines_and_events_are_capped_in_json() {
    let home = TempDir::new();
    let mut herd = Supervised::spawn(home.path(), "json", "out-cap-json", 2, &[]);
    let lines = herd.collect();
    let port = json_ready(&lines);
    for path in ["/bigline", "/bigmsg", "/bigcast", "/escape"] {
        get(port, path).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    wait_raw(&lines, "the message event", |l| {
        contains(l, r#""event":"message""#)
    });
    wait_raw(&lines, "the broadcast event", |l| {
        contains(l, r#""event":"broadcast""#)
    });
    wait_raw(&lines, "the other worker got the broadcast", |l| {
        contains(l, "got message: ")
    });
    wait_raw(&lines, "the huge line", |l| contains(l, r#"\u0001\u0001"#));
    let escape = wait_raw(&lines, "the escape line", |l| contains(l, "escape line"));
    let all = snapshot(&lines);
    assert_capped(&all);
    for line in &all {
        let value: Value = serde_json::from_slice(line)
            .unwrap_or_else(|e| panic!("a cut line is still JSON ({e}): {}", show(line)));
        assert!(value.is_object(), "{}", show(line));
    }
    let huge = all
        .iter()
        .find(|l| contains(l, r#"\u0001\u0001"#))
        .expect("the huge line");
    assert!(contains(huge, "cut"), "a marker: {}", show(huge));
    // JSON carries the text exactly, but no byte of the line is a terminal control.
    assert!(
        terminal_controls(&escape, false).is_empty(),
        "{:?}",
        terminal_controls(&escape, false)
    );
    let value: Value = serde_json::from_slice(&escape).expect("JSON");
    let text = value["line"].as_str().expect("line");
    assert!(text.contains("\x1b]0;pwned\x07") && text.contains('\u{9b}') && text.contains('\r'));
}

/// (b) text: the same payloads. Before the fix the text `broadcast` event was one line of
/// ~500 KB.
#[test]
fn huge_lines_and_events_are_capped_in_text() {
    let home = TempDir::new();
    let name = "out-cap-text";
    let mut herd = Supervised::spawn(home.path(), "text", name, 2, &[]);
    let lines = herd.collect();
    let port = status_ready(home.path(), name, 2);
    for path in ["/bigcast", "/bigmsg", "/bigline"] {
        get(port, path).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    // The event names the size, not the payload: "broadcast N bytes to K of M workers".
    wait_raw(&lines, "the broadcast event", |l| {
        contains(l, "broadcast ") && contains(l, " bytes to ")
    });
    wait_raw(&lines, "the message event", |l| contains(l, "message: "));
    wait_raw(&lines, "the other worker got the broadcast", |l| {
        contains(l, "got message: ")
    });
    assert_capped(&snapshot(&lines));
    let huge = wait_raw(&lines, "the huge line, escaped", |l| {
        contains(l, r"\x01\x01")
    });
    assert!(contains(&huge, "cut"), "a marker: {}", show(&huge));
    let all = snapshot(&lines);
    assert_capped(&all);
    for line in &all {
        let controls = terminal_controls(line, false);
        assert!(controls.is_empty(), "{controls:?}");
    }
}

/// (c) A worker prints a terminal title escape (`ESC ] 0 ; pwned BEL`), a C1 CSI and a
/// carriage return, then dies with them as its last words. Before the fix they reached the
/// terminal raw through herd's text output, `herd logs` and the "last exit" column of
/// `herd status`.
#[test]
fn terminal_escapes_from_workers_are_shown_escaped() {
    let home = TempDir::new();
    let name = "out-escapes";
    let mut herd = Supervised::spawn(home.path(), "text", name, 1, &[]);
    let lines = herd.collect();
    let port = status_ready(home.path(), name, 1);
    get(port, "/escape").expect("/escape");
    let line = wait_raw(&lines, "the escape line", |l| contains(l, "escape line"));
    assert!(
        terminal_controls(&line, false).is_empty(),
        "text output: {:?}",
        terminal_controls(&line, false)
    );
    assert!(contains(&line, r"\x1b]0;pwned\x07"), "{}", show(&line));

    let logs = cli(home.path(), &["logs", name]);
    logs.assert_ok();
    assert!(logs.stdout.contains("pwned"), "{logs}");
    let controls = terminal_controls(logs.stdout.as_bytes(), true);
    assert!(controls.is_empty(), "herd logs: {controls:?}");

    get(port, "/crash").expect("/crash");
    wait_status(home.path(), name, "the crash as last exit", |s| {
        workers(s)[0]["last_exit"]
            .as_str()
            .is_some_and(|e| e.contains("pwned"))
    });
    let status = cli(home.path(), &["status", name]);
    status.assert_ok();
    let controls = terminal_controls(status.stdout.as_bytes(), true);
    assert!(controls.is_empty(), "herd status: {controls:?}\n{status}");
    assert!(status.stdout.contains(r"\x1b"), "{status}");
    let json = cli(home.path(), &["status", name, "--json"]);
    json.assert_ok();
    let controls = terminal_controls(json.stdout.as_bytes(), true);
    assert!(controls.is_empty(), "herd status --json: {controls:?}");
    let logs = cli(home.path(), &["logs", name]);
    logs.assert_ok();
    let controls = terminal_controls(logs.stdout.as_bytes(), true);
    assert!(
        controls.is_empty(),
        "herd logs after the crash: {controls:?}"
    );
}

/// (d) `herd start` reads the supervisor's log file (`HERD_HOME/NAME.log`, appended to
/// forever) to explain a failed start. Before the fix it read the whole file: with 200 MB
/// there the CLI's peak RSS was over 200 MB.
#[test]
fn a_huge_log_file_costs_herd_start_bounded_memory() {
    let home = TempDir::new();
    let name = "out-biglog";
    std::fs::create_dir_all(home.path()).expect("home");
    let log = std::fs::File::create(home.join(&format!("{name}.log"))).expect("log file");
    log.set_len(200 << 20).expect("a sparse 200 MB log");
    drop(log);
    let missing = home.join("no-such-program");
    let missing = missing.to_str().expect("utf-8 path");
    let t = Instant::now();
    // The CLI's own peak RSS (ru_maxrss), measured by a small python3 parent: a process forked
    // from this test binary counts the test's own (large, busy) memory until it execs, so
    // wait4 from here would measure the test harness, not herd.
    let cmd = cli_command(home.path(), &["start", "--name", name, missing]);
    let mut wrapped = std::process::Command::new("python3");
    wrapped.args([
        "-c",
        "import os, sys\n\
         pid = os.fork()\n\
         if pid == 0:\n    os.execv(sys.argv[1], sys.argv[1:])\n\
         _, status, usage = os.wait4(pid, 0)\n\
         print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)",
    ]);
    wrapped.arg(cmd.get_program()).args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(v) => wrapped.env(key, v),
            None => wrapped.env_remove(key),
        };
    }
    wrapped.stdin(std::process::Stdio::null());
    let out = wrapped.output().expect("run herd start under python3");
    drop(cmd);
    let measured = String::from_utf8_lossy(&out.stdout);
    let mut words = measured.split_whitespace();
    let (code, maxrss_kb): (i32, i64) = match (words.next(), words.next()) {
        (Some(c), Some(m)) => (c.parse().expect("code"), m.parse().expect("maxrss")),
        _ => panic!(
            "no measurement: {measured} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    };
    let took = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("herd start: exit {code}, peak RSS {maxrss_kb} kB, {took:?}");
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("did not start"), "{stderr}");
    assert!(stderr.contains("no-such-program"), "the reason: {stderr}");
    assert!(
        maxrss_kb < 40 * 1024,
        "herd start peaked at {maxrss_kb} kB with a 200 MB log file"
    );
    assert!(took < Duration::from_secs(15), "{took:?}");
}
