//! What the control tests need beyond `util/`: running the herd CLI against an app's
//! `HERD_HOME` (bounded), reading `herd status --json`, a load generator that counts every
//! failed request, and a guard for apps started detached with `herd start`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

pub use crate::util::{
    all_pids, cli, cli_command, home_of, ready_pids, spawn_cli, spawn_command, status, wait_status,
    workers, CliOutput,
};
use crate::util::{
    get, pid_alive, start_named_listener, start_named_node, wait_requests, Herd, WAIT,
};

/// `herd run … -i N -e PORT=0 --name NAME EXTRA… fixtures/control_app.js` (real node, the
/// harness's JSON output).
pub fn start_node(name: &str, instances: usize, extra: &[&str]) -> Herd {
    start_named_node("control_app.js", name, instances, extra)
}

/// `herd run … -i N --listen 127.0.0.1:0 --name NAME EXTRA… fixtures/control_server.py`
/// (socket activation).
pub fn start_python(name: &str, instances: usize, extra: &[&str]) -> Herd {
    start_named_listener("control_server.py", name, instances, extra)
}

/// The control socket of app `name`.
pub fn socket_of(home: &Path, name: &str) -> PathBuf {
    home.join(format!("{name}.sock"))
}

// ---- status ----

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
        wait_requests("the load", n, WAIT, || self.done());
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
