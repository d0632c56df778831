//! herd.toml (`herd start FILE`, `herd run FILE --app NAME`, `herd apply`, `herd ls`'s
//! config column) and `herd import` of a PM2 ecosystem file. Every app runs detached in the
//! test's own `HERD_HOME` and is stopped (or killed) when the test ends.

mod apply;
mod files;
mod import;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::util::{
    all_pids, cli, fixture, get, pid_alive, spawn_cli, status, wait_requests, CliOutput, TempDir,
    WAIT,
};

/// A directory with a herd.toml and the fixtures it runs, and its own `HERD_HOME`.
pub struct Site {
    dir: TempDir,
    /// Apps that may be running, stopped on drop.
    names: Mutex<BTreeSet<String>>,
    pids: Mutex<BTreeSet<u32>>,
}

impl Site {
    pub fn new(fixtures: &[&str]) -> Site {
        let dir = TempDir::new();
        std::fs::create_dir_all(dir.join("site")).expect("site dir");
        for f in fixtures {
            std::fs::copy(fixture(f), dir.join("site").join(f)).expect("copy fixture");
        }
        Site {
            dir,
            names: Mutex::new(BTreeSet::new()),
            pids: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn home(&self) -> PathBuf {
        self.dir.join("home")
    }

    pub fn file(&self) -> PathBuf {
        self.dir.join("site").join("herd.toml")
    }

    pub fn file_str(&self) -> String {
        self.file().to_string_lossy().into_owned()
    }

    pub fn write(&self, toml: &str) {
        std::fs::write(self.file(), toml).expect("write herd.toml");
    }

    /// `herd ARGS…` in this site's `HERD_HOME`; apps named in `expect` are cleaned up later.
    pub fn herd(&self, args: &[&str]) -> CliOutput {
        cli(&self.home(), args)
    }

    pub fn track(&self, name: &str) {
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
    }

    /// `herd status NAME --json`, remembering its pids for the cleanup.
    pub fn status(&self, name: &str) -> Value {
        self.track(name);
        let s = status(&self.home(), name);
        self.learn(&s);
        s
    }

    fn learn(&self, s: &Value) {
        let mut pids = self.pids.lock().unwrap_or_else(|e| e.into_inner());
        pids.extend(all_pids(s));
        if let Some(pid) = s["pid"].as_u64() {
            pids.insert(pid as u32);
        }
    }
}

pub fn port_in(status: &Value) -> u16 {
    status["listen"][0]
        .as_str()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {status:#}"))
}

impl Drop for Site {
    fn drop(&mut self) {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for name in names {
            let _ = std::panic::catch_unwind(|| {
                spawn_cli(&self.home(), &["stop", &name]).finish(Duration::from_secs(15))
            });
        }
        for &pid in self.pids.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if pid_alive(pid) {
                // SAFETY: kill(2) of a process group whose leader pid herd reported for this
                // test's apps (herd makes every worker a group leader); a reused pid that
                // leads no group is left alone.
                unsafe {
                    if libc::getpgid(pid as i32) == pid as i32 {
                        libc::kill(-(pid as i32), libc::SIGKILL);
                    }
                }
            }
        }
    }
}

/// A bounded load: one client sending `GET /` in a loop (a connection per request), every
/// failure counted, until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    tally: Arc<Mutex<(usize, usize, Vec<String>)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let tally = Arc::new(Mutex::new((0, 0, Vec::new())));
        let (s, d, t) = (stop.clone(), done.clone(), tally.clone());
        let thread = std::thread::spawn(move || {
            // Bounded: at most 100k requests even if never stopped.
            for _ in 0..100_000 {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let r = get(port, "/");
                let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
                match r {
                    Ok(r) if r.status == 200 => t.0 += 1,
                    other => {
                        t.1 += 1;
                        if t.2.len() < 10 {
                            t.2.push(format!("{other:?}"));
                        }
                    }
                }
                drop(t);
                d.fetch_add(1, Ordering::Relaxed);
            }
        });
        Load {
            stop,
            done,
            tally,
            thread: Some(thread),
        }
    }

    pub fn wait_for(&self, n: usize) {
        wait_requests("the load", n, WAIT, || self.done.load(Ordering::Relaxed));
    }

    /// Stops the client after at least `more` further requests: (ok, failed, first errors).
    pub fn finish(mut self, more: usize) -> (usize, usize, Vec<String>) {
        let now = self.done.load(Ordering::Relaxed);
        self.wait_for(now + more);
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.tally.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `GET /` on the port, parsed.
pub fn hello(port: u16) -> Value {
    get(port, "/")
        .unwrap_or_else(|e| panic!("GET / on {port}: {e}"))
        .json()
}
