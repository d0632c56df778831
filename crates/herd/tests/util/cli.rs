//! The herd CLI against an app's `HERD_HOME`, bounded: `herd COMMAND …` as a subprocess
//! with its output captured, and `herd status --json` read and polled.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{herd_with_home, Herd, WAIT};

/// The `HERD_HOME` the harness gave a [`Herd`] (it keeps it private): read from the
/// supervisor's `/proc/PID/environ`.
pub fn home_of(herd: &Herd) -> PathBuf {
    let raw = std::fs::read(format!("/proc/{}/environ", herd.pid()))
        .unwrap_or_else(|e| panic!("reading herd's environment: {e}\n{}", herd.dump()));
    raw.split(|&b| b == 0)
        .find_map(|var| var.strip_prefix(b"HERD_HOME="))
        .map(|v| PathBuf::from(String::from_utf8_lossy(v).into_owned()))
        .expect("the harness sets HERD_HOME")
}

// ---- the CLI ----

/// What a finished `herd COMMAND …` printed.
#[derive(Debug)]
pub struct CliOutput {
    pub args: Vec<String>,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// How long it ran.
    pub took: Duration,
}

impl CliOutput {
    /// Panics (with everything it printed) unless it exited 0.
    pub fn assert_ok(&self) -> &Self {
        assert_eq!(self.code, Some(0), "herd {:?} failed\n{self}", self.args);
        self
    }
}

impl std::fmt::Display for CliOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "herd {:?}: exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args, self.code, self.stdout, self.stderr
        )
    }
}

/// A `herd COMMAND …` still running; killed on drop.
pub struct CliRun {
    args: Vec<String>,
    child: Child,
    started: Instant,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl CliRun {
    /// Waits for it to exit, up to `timeout` from now (then kills it and panics).
    pub fn finish(mut self, timeout: Duration) -> CliOutput {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let out = self.collect(None);
                panic!(
                    "herd {:?} did not exit within {timeout:?}\n{out}",
                    self.args
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        self.collect(status.code())
    }

    fn collect(&mut self, code: Option<i32>) -> CliOutput {
        let took = self.started.elapsed();
        let text = |h: Option<JoinHandle<Vec<u8>>>| {
            h.and_then(|h| h.join().ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        CliOutput {
            args: self.args.clone(),
            code,
            stdout: text(self.stdout.take()),
            stderr: text(self.stderr.take()),
            took,
        }
    }
}

impl Drop for CliRun {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `herd ARGS…` with `HERD_HOME=home`, stdout and stderr captured.
pub fn cli_command(home: &Path, args: &[&str]) -> Command {
    let mut cmd = herd_with_home(home);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Starts `herd ARGS…` with `HERD_HOME=home`.
pub fn spawn_cli(home: &Path, args: &[&str]) -> CliRun {
    spawn_command(cli_command(home, args), args)
}

/// Starts a prepared command (stdout and stderr piped) and drains its output.
pub fn spawn_command(mut cmd: Command, args: &[&str]) -> CliRun {
    let started = Instant::now();
    let mut child = cmd.spawn().expect("start herd");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = child.stdout.take().map(|s| drain(Box::new(s)));
    let stderr = child.stderr.take().map(|s| drain(Box::new(s)));
    CliRun {
        args: args.iter().map(|s| s.to_string()).collect(),
        child,
        started,
        stdout,
        stderr,
    }
}

/// Runs `herd ARGS…` to its end (bounded by [`WAIT`]).
pub fn cli(home: &Path, args: &[&str]) -> CliOutput {
    spawn_cli(home, args).finish(WAIT)
}

// ---- status ----

/// `herd status NAME --json`, parsed; panics unless it exits 0.
pub fn status(home: &Path, name: &str) -> Value {
    let out = cli(home, &["status", name, "--json"]);
    out.assert_ok();
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e})\n{out}"))
}

/// Polls `herd status NAME --json` until `done` holds (bounded by [`WAIT`]).
pub fn wait_status(home: &Path, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = status(home, name);
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}; last status:\n{s:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn workers(status: &Value) -> &Vec<Value> {
    status["workers"].as_array().expect("workers array")
}

/// Pids of the workers a status shows in state `ready`.
pub fn ready_pids(status: &Value) -> BTreeSet<u32> {
    workers(status)
        .iter()
        .filter(|w| w["state"] == "ready")
        .map(|w| w["pid"].as_u64().expect("pid") as u32)
        .collect()
}

/// Pids of every worker a status shows.
pub fn all_pids(status: &Value) -> BTreeSet<u32> {
    workers(status)
        .iter()
        .filter_map(|w| w["pid"].as_u64())
        .filter(|&p| p != 0)
        .map(|p| p as u32)
        .collect()
}
