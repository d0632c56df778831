//! What the control tests need beyond `util/`: running the herd CLI against an app's
//! `HERD_HOME` (bounded), reading `herd status --json`, a load generator that counts every
//! failed request, and a guard for apps started detached with `herd start`.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{fixture, get, herd_bin, pid_alive, Herd, WAIT};

/// Variables of the test's own environment that would change what herd does.
const SCRUBBED_ENV: [&str; 12] = [
    "PORT",
    "HERD_HOME",
    "HERD_APP",
    "HERD_WORKER_ID",
    "HERD_INSTANCE",
    "NODE_APP_INSTANCE",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "NODE_UNIQUE_ID",
    "NODE_CHANNEL_FD",
];

/// `herd run … -i N -e PORT=0 --name NAME EXTRA… fixtures/control_app.js` (real node, the
/// harness's JSON output).
pub fn start_node(name: &str, instances: usize, extra: &[&str]) -> Herd {
    let app = fixture("control_app.js");
    let n = instances.to_string();
    let mut args = vec!["-i", &n, "-e", "PORT=0", "--name", name];
    args.extend_from_slice(extra);
    args.push(&app);
    Herd::start(&args)
}

/// `herd run … -i N --listen 127.0.0.1:0 --name NAME EXTRA… fixtures/control_server.py`
/// (socket activation).
pub fn start_python(name: &str, instances: usize, extra: &[&str]) -> Herd {
    let app = fixture("control_server.py");
    let n = instances.to_string();
    let mut args = vec!["-i", &n, "--listen", "127.0.0.1:0", "--name", name];
    args.extend_from_slice(extra);
    args.push(&app);
    Herd::start(&args)
}

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

/// The control socket of app `name`.
pub fn socket_of(home: &Path, name: &str) -> PathBuf {
    home.join(format!("{name}.sock"))
}

// ---- the CLI ----

/// What a finished `herd COMMAND …` printed.
#[derive(Debug)]
pub struct CliOutput {
    pub args: Vec<String>,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
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

/// A `herd COMMAND …` still running.
pub struct CliRun {
    args: Vec<String>,
    child: Child,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl CliRun {
    /// Waits for it to exit, up to `timeout` (then kills it and panics).
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
    let mut cmd = Command::new(herd_bin());
    cmd.args(args);
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd.env("HERD_HOME", home)
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

pub fn workers(status: &Value) -> &Vec<Value> {
    status["workers"].as_array().expect("workers array")
}

/// The status of an app whose `desired` workers are all ready, and nothing else runs: no
/// worker starting or stopping.
pub fn settled(status: &Value, desired: usize) -> bool {
    status["state"] == "running"
        && status["desired"] == desired
        && status["ready"] == desired
        && workers(status).len() == desired
        && ready_pids(status).len() == desired
}

// ---- load ----

/// Clients, one per path, each sending `GET path` in a loop (one connection per request,
/// `Connection: close`) until told to stop; every failure is kept.
pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    shared: Arc<Mutex<Tally>>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Default)]
struct Tally {
    ok: usize,
    failed: usize,
    errors: Vec<String>,
    pids: BTreeSet<u32>,
}

/// What a [`Load`] saw.
#[derive(Debug)]
pub struct LoadReport {
    pub ok: usize,
    pub failed: usize,
    /// The first failures, described.
    pub errors: Vec<String>,
    /// The worker pids that answered.
    pub pids: BTreeSet<u32>,
}

impl LoadReport {
    pub fn assert_clean(&self, what: &str) {
        assert_eq!(
            self.failed,
            0,
            "{what}: {} of {} requests failed; first failures:\n{}",
            self.failed,
            self.ok + self.failed,
            self.errors.join("\n")
        );
    }
}

impl Load {
    pub fn start(port: u16, paths: &[&'static str]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(Mutex::new(Tally::default()));
        let started = Instant::now();
        let threads = paths
            .iter()
            .map(|&path| {
                let (stop, done, shared) = (stop.clone(), done.clone(), shared.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let result = get(port, path);
                        let mut t = shared.lock().unwrap_or_else(|e| e.into_inner());
                        match result {
                            Ok(r) if r.status == 200 => {
                                t.ok += 1;
                                let pid = serde_json::from_str::<Value>(&r.body)
                                    .ok()
                                    .and_then(|v| v["pid"].as_u64());
                                if let Some(pid) = pid {
                                    t.pids.insert(pid as u32);
                                }
                            }
                            other => {
                                t.failed += 1;
                                if t.errors.len() < 20 {
                                    let at = started.elapsed();
                                    t.errors.push(format!("after {at:?}: {other:?}"));
                                }
                            }
                        }
                        drop(t);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load {
            stop,
            done,
            shared,
            threads,
        }
    }

    /// Requests finished so far (answered or failed).
    pub fn done(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until `n` requests finished in all (bounded by [`WAIT`]).
    pub fn wait_for(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        while self.done() < n {
            assert!(
                Instant::now() < deadline,
                "the load made only {} of {n} requests in {WAIT:?}",
                self.done()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Keeps going until `min_total` requests finished (bounded), then stops the clients.
    pub fn finish(mut self, min_total: usize) -> LoadReport {
        self.wait_for(min_total);
        self.stop_clients();
        let t = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        LoadReport {
            ok: t.ok,
            failed: t.failed,
            errors: t.errors.clone(),
            pids: t.pids.clone(),
        }
    }

    fn stop_clients(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop_clients();
    }
}

// ---- herd start ----

/// An app started detached with `herd start`: stopped on drop with `herd stop`, and if that
/// fails its supervisor and workers (pids learnt from `herd status`) are killed.
pub struct Detached {
    pub home: PathBuf,
    pub name: String,
    supervisor: Option<u32>,
    workers: BTreeSet<u32>,
}

impl Detached {
    pub fn new(home: &Path, name: &str) -> Self {
        Detached {
            home: home.to_path_buf(),
            name: name.to_string(),
            supervisor: None,
            workers: BTreeSet::new(),
        }
    }

    /// Remembers the supervisor and worker pids a status shows, for the cleanup.
    pub fn learn(&mut self, status: &Value) {
        if let Some(pid) = status["pid"].as_u64() {
            self.supervisor = Some(pid as u32);
        }
        self.workers.extend(all_pids(status));
    }

    pub fn supervisor(&self) -> Option<u32> {
        self.supervisor
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if let Ok(out) = std::panic::catch_unwind(|| {
            spawn_cli(&self.home, &["status", &self.name, "--json"]).finish(WAIT)
        }) {
            if let Ok(s) = serde_json::from_str::<Value>(&out.stdout) {
                self.learn(&s);
            }
        }
        let _ = std::panic::catch_unwind(|| {
            spawn_cli(&self.home, &["stop", &self.name]).finish(Duration::from_secs(15))
        });
        if let Some(pid) = self.supervisor {
            if pid_alive(pid) && is_herd(pid) {
                // SAFETY: kill(2) on the supervisor pid this test learnt from herd status.
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
        }
        for &pid in &self.workers {
            kill_group(pid);
        }
    }
}

/// Whether `pid` runs the herd binary (so a reused pid is never killed).
fn is_herd(pid: u32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .is_ok_and(|exe| exe.to_string_lossy().contains("herd"))
}

/// SIGKILLs a worker's process group if it is still a group leader (herd makes every
/// worker one; a pid that is not was reused).
pub fn kill_group(pid: u32) {
    if !pid_alive(pid) {
        return;
    }
    // SAFETY: getpgid and kill on a pid learnt from herd; no memory involved.
    unsafe {
        if libc::getpgid(pid as i32) == pid as i32 {
            libc::kill(-(pid as i32), libc::SIGKILL);
        }
    }
}

// ---- the protocol itself ----

/// Sends one request line on an app's control socket and reads the one-line answer, as the
/// CLI does, without the CLI's process start and exit around it.
pub fn raw_request(socket: &Path, request: &str) -> Value {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream.set_write_timeout(Some(WAIT)).expect("timeout");
    writeln!(stream, "{request}").expect("send the request");
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("read the answer");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("answer {line:?}: {e}"))
}
