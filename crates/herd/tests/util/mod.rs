//! The harness: start herd on port 0 with JSON output, wait for its events, talk HTTP to it,
//! and make sure nothing it started outlives the test.
//!
//! [`Herd`] runs `herd run --log-format json …` with `HERD_HOME` in a fresh short temp dir.
//! A thread parses every stdout line into a shared list and wakes waiters, so a test waits
//! for a state (`all_ready`, `exited`, a worker's line) instead of sleeping. Dropping a
//! [`Herd`] stops it (SIGTERM, then SIGKILL) and kills every worker pid it announced.

#![allow(dead_code)] // Each test module uses a different part of the harness.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

mod cli;
pub mod system;

pub use cli::{
    all_pids, cli, cli_command, home_of, ready_pids, spawn_cli, spawn_command, status, wait_status,
    workers, CliOutput,
};

/// The bound for every wait on herd: generous, because the suite runs in parallel on
/// small machines. A state that never comes fails the test after this long.
pub const WAIT: Duration = Duration::from_secs(30);

/// Worker lines kept in [`Herd::events`]; later ones are only counted (a flood of output
/// must not fill the test's memory).
const KEPT_LINES: usize = 20_000;

/// Variables from the test's own environment that would change what herd or its workers do.
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

pub fn herd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_herd")
}

/// A file in `tests/fixtures/`, as an absolute path string.
pub fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    assert!(path.exists(), "missing fixture {}", path.display());
    path.to_string_lossy().into_owned()
}

/// `herd run … -i N -e PORT=0 --name NAME EXTRA… fixtures/APP`: a Node fixture whose
/// workers `listen(0)`.
pub fn start_named_node(app: &str, name: &str, instances: usize, extra: &[&str]) -> Herd {
    start_fixture(app, instances, &["-e", "PORT=0", "--name", name], extra)
}

/// `herd run … -i N --listen 127.0.0.1:0 --name NAME EXTRA… fixtures/APP`: a
/// socket-activation fixture.
pub fn start_named_listener(app: &str, name: &str, instances: usize, extra: &[&str]) -> Herd {
    start_fixture(
        app,
        instances,
        &["--listen", "127.0.0.1:0", "--name", name],
        extra,
    )
}

/// `herd run … -i N OPTIONS… EXTRA… fixtures/APP`.
fn start_fixture(app: &str, instances: usize, options: &[&str], extra: &[&str]) -> Herd {
    let app = fixture(app);
    let n = instances.to_string();
    let mut args = vec!["-i", n.as_str()];
    args.extend_from_slice(options);
    args.extend_from_slice(extra);
    args.push(&app);
    Herd::start(&args)
}

/// A fresh directory `/tmp/herd-t-<pid>-<n>`, short enough for unix socket paths, removed
/// on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!("/tmp/herd-t-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[derive(Default)]
struct State {
    /// Every herd event and the first [`KEPT_LINES`] worker lines, in order.
    events: Vec<Value>,
    /// Worker lines seen in all, kept or not.
    lines_seen: usize,
    /// The most recent worker line.
    last_line: Option<Value>,
    /// stdout lines that were not JSON (herd's contract says there are none).
    not_json: Vec<String>,
    stdout_closed: bool,
    stderr: String,
    /// Worker pids from `spawned` events: killed on drop.
    pids: Vec<u32>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running `herd run`.
pub struct Herd {
    child: Child,
    shared: Arc<Shared>,
    status: Option<ExitStatus>,
    home: TempDir,
}

impl Herd {
    /// Starts `herd run --log-format json ARGS…`.
    pub fn start(args: &[&str]) -> Herd {
        let home = TempDir::new();
        let mut cmd = herd_command(home.path(), args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Herd::spawn(cmd, home)
    }

    /// Spawns `cmd` (a herd with piped stdout and stderr) and reads its JSON events.
    pub(crate) fn spawn(mut cmd: Command, home: TempDir) -> Herd {
        let mut child = cmd.spawn().expect("start herd");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let s = Arc::clone(&shared);
        std::thread::spawn(move || read_stdout(stdout, &s));
        let s = Arc::clone(&shared);
        std::thread::spawn(move || read_stderr(stderr, &s));
        Herd {
            child,
            shared,
            status: None,
            home,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A copy of everything seen so far.
    pub fn events(&self) -> Vec<Value> {
        self.shared.lock().events.clone()
    }

    /// How many events are stored now: pass it to [`Herd::wait_event_after`] to wait for
    /// something that happens from now on.
    pub fn mark(&self) -> usize {
        self.shared.lock().events.len()
    }

    pub fn stderr(&self) -> String {
        self.shared.lock().stderr.clone()
    }

    /// stdout lines that were not JSON objects.
    pub fn not_json(&self) -> Vec<String> {
        self.shared.lock().not_json.clone()
    }

    /// Worker lines seen so far, including those not kept.
    pub fn lines_seen(&self) -> usize {
        self.shared.lock().lines_seen
    }

    pub fn last_line(&self) -> Option<Value> {
        self.shared.lock().last_line.clone()
    }

    /// Waits until `done` holds for the events, or panics with what was seen.
    pub fn wait_for(&self, what: &str, done: impl Fn(&[Value]) -> bool) {
        self.wait_until(what, WAIT, |state| done(&state.events).then_some(()));
    }

    /// The first event (from index `from` on) that matches, waiting for it.
    pub fn wait_event_after(
        &self,
        what: &str,
        from: usize,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_until(what, WAIT, |state| {
            state.events.iter().skip(from).find(|e| pred(e)).cloned()
        })
    }

    /// The first event that matches, waiting for it.
    pub fn wait_event(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_event_after(what, 0, pred)
    }

    /// The first herd event named `name` from index `from` on.
    pub fn wait_named_after(&self, name: &str, from: usize) -> Value {
        self.wait_event_after(name, from, |e| e["event"] == name)
    }

    /// The first herd event named `name`.
    pub fn wait_named(&self, name: &str) -> Value {
        self.wait_named_after(name, 0)
    }

    /// Waits for every slot to have a ready worker.
    pub fn wait_ready(&self) {
        self.wait_named("all_ready");
    }

    /// The first worker line (from index `from` on) containing `text`.
    pub fn wait_line_after(&self, from: usize, text: &str) -> Value {
        self.wait_event_after(&format!("a worker line containing {text:?}"), from, |e| {
            e["line"].as_str().is_some_and(|l| l.contains(text))
        })
    }

    /// The TCP port of the first `bound` event (herd's own --listen or a Node server).
    pub fn port(&self) -> u16 {
        let bound = self.wait_named("bound");
        port_of(&bound)
    }

    /// Generic bounded wait on the shared state.
    fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&State) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if let Some(found) = check(&state) {
                return found;
            }
            let now = Instant::now();
            if now >= deadline {
                let dump = describe(&state);
                drop(state);
                panic!("timed out after {timeout:?} waiting for {what}\n{dump}");
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Worker pids announced by `spawned` events so far.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.shared.lock().pids.clone()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of our own child.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for herd to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.status {
            return Some(status);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait herd") {
                self.status = Some(status);
                // Let the reader thread take the last lines.
                self.wait_until("herd's stdout to close", WAIT, |s| {
                    s.stdout_closed.then_some(())
                });
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for herd to exit on its own, or panics.
    pub fn expect_exit(&mut self) -> ExitStatus {
        match self.wait_exit(WAIT) {
            Some(status) => status,
            None => {
                let dump = describe(&self.shared.lock());
                panic!("herd did not exit within {WAIT:?}\n{dump}");
            }
        }
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.expect_exit()
    }

    /// Panics unless every worker herd started is gone.
    pub fn assert_no_worker_left(&self) {
        for pid in self.worker_pids() {
            assert!(
                wait_dead(pid, Duration::from_secs(5)),
                "worker {pid} outlived herd"
            );
        }
    }

    /// A description of everything seen, for failure messages.
    pub fn dump(&self) -> String {
        describe(&self.shared.lock())
    }
}

impl Drop for Herd {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.signal(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = self.child.try_wait() {
                    self.status = Some(status);
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.status.is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        for pid in self.worker_pids() {
            kill_worker(pid);
        }
        // `home` (HERD_HOME) is removed after this, once nothing uses it.
    }
}

/// SIGKILLs a worker's process group, if it is still ours: herd makes every worker the
/// leader of its own group. A live pid that leads no group was reused by someone else. A dead
/// leader's group may still hold its children (a helper it spawned, once herd itself was
/// killed too hard to kill the group): a pgid number stays reserved while any member lives,
/// so signalling it reaches only what that worker left behind.
fn kill_worker(pid: u32) {
    let pid = pid as i32;
    // SAFETY: getpgid and kill on a pid; no memory involved.
    unsafe {
        if !pid_alive(pid as u32) || libc::getpgid(pid) == pid {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

/// `herd` with [`SCRUBBED_ENV`] removed from its environment and `HERD_HOME=herd_home`.
fn herd_with_home(herd_home: &Path) -> Command {
    let mut cmd = Command::new(herd_bin());
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd.env("HERD_HOME", herd_home);
    cmd
}

fn herd_command(home: &Path, args: &[&str]) -> Command {
    let mut cmd = herd_with_home(&home.join("home"));
    cmd.arg("run").arg("--log-format").arg("json").args(args);
    cmd
}

/// Runs `herd run --log-format json ARGS…` to its end (bounded), for start-up errors.
pub fn run_to_end(args: &[&str]) -> (Output, TempDir) {
    let home = TempDir::new();
    let mut child = herd_command(home.path(), args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start herd");
    let deadline = Instant::now() + WAIT;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "herd {args:?} did not exit within {WAIT:?}; stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (child.wait_with_output().expect("output"), home)
}

/// Calls `each` with every line `r` gives (its newline kept), until end of file or an error.
fn for_each_line(r: impl Read, mut each: impl FnMut(&[u8])) {
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        each(&buf);
    }
}

fn read_stdout(stdout: impl Read, shared: &Shared) {
    for_each_line(stdout, |buf| {
        let text = String::from_utf8_lossy(buf);
        let text = text.trim_end_matches('\n');
        let mut state = shared.lock();
        match serde_json::from_str::<Value>(text) {
            Ok(value) if value.is_object() => {
                if value.get("line").is_some() {
                    state.lines_seen += 1;
                    state.last_line = Some(value.clone());
                    if state.lines_seen <= KEPT_LINES {
                        state.events.push(value);
                    }
                } else {
                    if value["event"] == "spawned" {
                        if let Some(pid) = value["pid"].as_u64() {
                            state.pids.push(pid as u32);
                        }
                    }
                    state.events.push(value);
                }
            }
            _ => state.not_json.push(text.chars().take(500).collect()),
        }
        drop(state);
        shared.changed.notify_all();
    });
    shared.lock().stdout_closed = true;
    shared.changed.notify_all();
}

fn read_stderr(stderr: impl Read, shared: &Shared) {
    for_each_line(stderr, |buf| {
        let mut state = shared.lock();
        if state.stderr.len() < 1 << 20 {
            state.stderr.push_str(&String::from_utf8_lossy(buf));
        }
        drop(state);
        shared.changed.notify_all();
    });
}

fn describe(state: &State) -> String {
    let mut out = String::new();
    let skip = state.events.len().saturating_sub(60);
    out.push_str(&format!(
        "--- last {} of {} events ({} worker lines seen) ---\n",
        state.events.len() - skip,
        state.events.len(),
        state.lines_seen
    ));
    for e in state.events.iter().skip(skip) {
        let mut s = e.to_string();
        if s.chars().count() > 400 {
            s = s.chars().take(400).chain(['…']).collect();
        }
        out.push_str(&s);
        out.push('\n');
    }
    if !state.not_json.is_empty() {
        out.push_str(&format!("--- non-JSON stdout ---\n{:?}\n", state.not_json));
    }
    out.push_str(&format!("--- stderr ---\n{}", state.stderr));
    out
}

/// The port in a `bound` event's `address` (`[::]:40123`, `0.0.0.0:40123`).
pub fn port_of(bound: &Value) -> u16 {
    let addr = bound["address"].as_str().expect("bound has an address");
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr}"))
}

/// A test's prerequisite (a tool, root) is missing: under CI (`CI` set, as every CI service
/// does) that is a failure, so a skipped check never passes for a run; elsewhere the test
/// says SKIPPED on stderr and returns.
pub fn prerequisite_missing(what: &str) {
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0") {
        panic!("CI is set but a prerequisite is missing: {what}");
    }
    eprintln!("SKIPPED (set CI=true to make this a failure): {what}");
}

/// An event's `ts` (`2026-11-28T15:30:00.123Z`) as milliseconds since the epoch.
pub fn ts_ms(event: &Value) -> i64 {
    let ts = event["ts"]
        .as_str()
        .unwrap_or_else(|| panic!("no ts in {event}"));
    let num = |range: std::ops::Range<usize>| -> i64 {
        ts.get(range)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad ts {ts:?}"))
    };
    let (y, m, d) = (num(0..4), num(5..7), num(8..10));
    // Days since 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + num(11..13) * 3600 + num(14..16) * 60 + num(17..19);
    secs * 1000 + num(20..23)
}

// ---- processes ----

/// Whether `pid` is a live process (zombies count as dead).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the command name, which is in parentheses.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z' | 'X') | None)
        }
        Err(_) => false,
    }
}

/// Waits up to `timeout` for `pid` to be gone.
pub fn wait_dead(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while pid_alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Resident memory of `pid` in kB, from /proc/PID/status.
pub fn rss_kb(pid: u32) -> Option<u64> {
    proc_status_kb(pid, "VmRSS:")
}

/// The peak resident memory of `pid` in kB since it started (the kernel's high-water mark,
/// `VmHWM`): a short spike between two samples is still counted.
pub fn peak_rss_kb(pid: u32) -> Option<u64> {
    proc_status_kb(pid, "VmHWM:")
}

fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

pub fn kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a worker pid this test learnt from herd.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}): {}", io::Error::last_os_error());
}

// ---- HTTP ----

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// `GET path` on 127.0.0.1:port.
pub fn get(port: u16, path: &str) -> io::Result<Response> {
    get_from(None, port, path)
}

/// `GET path` on 127.0.0.1:port from a given local address (e.g. 127.0.0.2).
pub fn get_from(source: Option<Ipv4Addr>, port: u16, path: &str) -> io::Result<Response> {
    let dest = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = match source {
        None => TcpStream::connect_timeout(&dest, CONNECT_TIMEOUT)?,
        Some(src) => {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.bind(&SocketAddr::from((IpAddr::V4(src), 0)).into())?;
            socket.connect_timeout(&dest.into(), CONNECT_TIMEOUT)?;
            TcpStream::from(socket)
        }
    };
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    exchange(stream, path)
}

/// `GET path` over a unix socket.
pub fn get_unix(socket: &Path, path: &str) -> io::Result<Response> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    exchange(stream, path)
}

fn exchange(mut stream: impl Read + Write, path: &str) -> io::Result<Response> {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    stream.flush()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> io::Result<Response> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    if raw.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed without a response",
        ));
    }
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    Ok(Response {
        status,
        body: body.to_string(),
    })
}

/// The pid in a JSON body, as the fixtures report it.
pub fn pid_in(r: &Response) -> u32 {
    r.json()["pid"].as_u64().expect("pid in body") as u32
}

/// Polls `check` every 10 ms until it returns something, or panics after [`WAIT`]. For
/// conditions that are not in herd's output (a thread finishing, a file appearing).
pub fn poll_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `done()` (requests finished so far) reaches `n`, checking every 5 ms, or
/// panics after `timeout` saying that `who` made too few.
pub fn wait_requests(who: &str, n: usize, timeout: Duration, done: impl Fn() -> usize) {
    let deadline = Instant::now() + timeout;
    while done() < n {
        assert!(
            Instant::now() < deadline,
            "{who} made only {} of {n} requests in {timeout:?}",
            done()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---- scenarios shared by several modules ----

/// Waits for `herd` to be ready, sends it SIGTERM while a 1.5 s request (`/slow?ms=1500`)
/// is in flight, and checks that the request completes, herd exits 0 and no worker
/// outlives it.
pub fn sigterm_with_a_slow_request_in_flight(herd: &mut Herd) {
    herd.wait_ready();
    let port = herd.port();
    let mark = herd.mark();
    let request = std::thread::spawn(move || get(port, "/slow?ms=1500"));
    herd.wait_line_after(mark, "slow start");
    herd.signal(libc::SIGTERM);
    let response = request
        .join()
        .expect("request thread")
        .expect("the slow request completes");
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["slept_ms"], 1500);
    let status = herd.expect_exit();
    assert_eq!(status.code(), Some(0), "{}", herd.dump());
    herd.assert_no_worker_left();
}
