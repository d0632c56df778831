//! `herd logs` (recent lines, a closed pipe, follow) and `herd send`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::time::Duration;

use super::support::{cli, cli_command, home_of, ready_pids, settled, start_node, wait_status};
use crate::util::{get, poll_until, WAIT};

#[test]
fn logs_prints_the_last_lines() {
    let name = "ctl-logs";
    let herd = start_node(name, 1, &[]);
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);
    let s = wait_status(&home, name, "ready", |s| settled(s, 1));
    let pid = *ready_pids(&s).first().expect("a worker");
    let mark = herd.mark();
    get(port, "/print?n=20&tag=ctl-line").expect("request");
    herd.wait_line_after(mark, "ctl-line 19");

    let want: Vec<String> = (15..20)
        .map(|i| format!("{name}[0] {pid} | ctl-line {i}"))
        .collect();
    let out = cli(&home, &["logs", name, "-n", "5"]);
    out.assert_ok();
    let got: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(got, want, "{out}");
    let out = cli(&home, &["logs", name, "-n", "5", "--instance", "0"]);
    out.assert_ok();
    assert_eq!(out.stdout.lines().collect::<Vec<_>>(), want, "{out}");
    let out = cli(&home, &["logs", name, "--instance", "7"]);
    out.assert_ok();
    assert!(out.stdout.is_empty(), "no such instance, no lines\n{out}");

    // The default shows herd's own events too.
    let out = cli(&home, &["logs", name]);
    out.assert_ok();
    assert!(out.stdout.contains(&format!("herd: {name}")), "{out}");
    assert!(out.stdout.contains("ctl-line 0"), "{out}");
}

#[test]
fn logs_into_a_closed_pipe_exits_zero() {
    let name = "ctl-logs-pipe";
    let herd = start_node(name, 1, &[]);
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);
    wait_status(&home, name, "ready", |s| settled(s, 1));
    // More output than a pipe holds (about 400 KB), so herd must still be writing when
    // the reader goes away.
    let mark = herd.mark();
    let tag = format!("bulk-{}", "x".repeat(100));
    get(port, &format!("/print?n=4000&tag={tag}")).expect("request");
    herd.wait_line_after(mark, &format!("{tag} 3999"));

    // `herd logs NAME -n 5000 | head -1`.
    let mut child = Reaped(
        cli_command(&home, &["logs", name, "-n", "5000"])
            .spawn()
            .expect("start herd logs"),
    );
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first).expect("first line");
    assert!(first.contains(name), "{first:?}");
    drop(out);
    let status = wait_child(&mut child, "herd logs into a closed pipe");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert_eq!(
        status.code(),
        Some(0),
        "exit 0 after a broken pipe: {status:?} {stderr}"
    );
    assert!(stderr.is_empty(), "{stderr}");

    // The same as a shell pipeline, the way people type it.
    let script = format!("\"$0\" logs {name} -n 5000 | head -1; exit ${{PIPESTATUS[0]}}");
    let mut sh = std::process::Command::new("bash");
    sh.args(["-c", &script, crate::util::herd_bin()])
        .env("HERD_HOME", &home)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = super::support::spawn_command(sh, &["(bash) logs | head -1"]).finish(WAIT);
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.stdout.lines().count(), 1, "{out}");
    assert!(out.stderr.is_empty(), "{out}");

    // `herd logs -f` whose reader goes away: the next line it writes ends it, with 0.
    let mut child = Reaped(
        cli_command(&home, &["logs", name, "-n", "1", "-f"])
            .spawn()
            .expect("start herd logs -f"),
    );
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first).expect("first line");
    drop(out);
    let mut n = 0;
    let status = poll_until("herd logs -f to notice its reader is gone", || {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        // Lines until the write fails; a few per round.
        n += 1;
        get(port, &format!("/print?n=50&tag=follow-{n}")).expect("request");
        std::thread::sleep(Duration::from_millis(20));
        None
    });
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// A `herd logs` child that is killed and reaped however the test ends.
struct Reaped(std::process::Child);

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn wait_child(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: did not exit within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn logs_follow_streams_new_lines() {
    let name = "ctl-follow";
    let herd = start_node(name, 1, &[]);
    herd.wait_ready();
    let port = herd.port();
    let home = home_of(&herd);
    wait_status(&home, name, "ready", |s| settled(s, 1));
    let mut child = Reaped(
        cli_command(&home, &["logs", name, "-n", "0", "-f"])
            .spawn()
            .expect("start herd logs -f"),
    );
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The subscription starts when herd answers; print until a line comes through.
    let mut n = 0;
    let line = poll_until("a followed line", || {
        n += 1;
        get(port, &format!("/print?n=1&tag=followed-{n}")).expect("request");
        rx.recv_timeout(Duration::from_millis(200)).ok()
    });
    assert!(line.contains("| followed-"), "{line}");

    // The app stops: the follower sees the end and exits 0.
    cli(&home, &["stop", name]).assert_ok();
    let status = wait_child(&mut child, "herd logs -f after herd stop");
    assert_eq!(status.code(), Some(0), "{status:?}");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("stopping")),
        "the follower saw the stop: {rest:?}"
    );
}

#[test]
fn send_reaches_the_node_workers() {
    let name = "ctl-send";
    let herd = start_node(name, 2, &[]);
    herd.wait_ready();
    let home = home_of(&herd);
    let s = wait_status(&home, name, "every worker ready", |s| settled(s, 2));
    let pids = ready_pids(&s);

    let mark = herd.mark();
    let out = cli(&home, &["send", name, r#"{"x":1}"#]);
    out.assert_ok();
    assert!(out.stdout.contains("sent to 2 workers"), "{out}");
    let want = r#"got message: {"x":1}"#;
    herd.wait_for("both workers to print the message", |events| {
        let got: BTreeSet<u32> = events[mark..]
            .iter()
            .filter(|e| e["line"] == want)
            .filter_map(|e| e["pid"].as_u64())
            .map(|p| p as u32)
            .collect();
        got == pids
    });
    // herd logs has them too.
    let logs = cli(&home, &["logs", name]);
    logs.assert_ok();
    for pid in &pids {
        assert!(
            logs.stdout.contains(&format!("{pid} | {want}")),
            "worker {pid}\n{logs}"
        );
    }

    // One instance only.
    let mark = herd.mark();
    let out = cli(&home, &["send", name, r#"{"only":1}"#, "--instance", "1"]);
    out.assert_ok();
    assert!(out.stdout.contains("sent to 1 workers"), "{out}");
    let line = herd.wait_line_after(mark, r#"got message: {"only":1}"#);
    assert_eq!(line["instance"], 1, "{line}");

    let bad = cli(&home, &["send", name, "{not json"]);
    assert_eq!(bad.code, Some(1), "{bad}");
    assert!(bad.stderr.contains("not JSON"), "{bad}");
    let none = cli(&home, &["send", name, "1", "--instance", "9"]);
    assert_eq!(none.code, Some(1), "{none}");
    assert!(none.stderr.contains("no worker matched"), "{none}");
    let after = herd
        .events()
        .iter()
        .skip(mark)
        .filter(|e| e["line"].as_str().is_some_and(|l| l.contains("only")))
        .count();
    assert_eq!(after, 1, "instance 0 got nothing\n{}", herd.dump());
}
