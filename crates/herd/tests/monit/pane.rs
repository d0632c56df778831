//! A tmux pane of a fixed size (160x45) running `herd`, for the tests that need a real
//! terminal. Each pane has its own tmux server, on a socket in a temp directory of its own
//! (`-S`: like a unique `-L` name, but the socket file goes with the directory; tmux leaves
//! it behind when its server exits), and kills the one session it created when dropped.

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::util::{herd_bin, prerequisite_missing, TempDir, WAIT};

/// The pane runs herd (`$MONIT_ARGS` split on spaces: the tests' own words), then says how it exited and whether the terminal is back in
/// cooked mode, then stays open so that the test can read all that.
const PANE_SCRIPT: &str = r#""$MONIT_HERD" $MONIT_ARGS; echo "monit exited $?"
if stty -a | grep -q -- -icanon; then echo TTY-RAW; else echo TTY-COOKED; fi
exec sleep 300"#;

/// A tmux server of its own with one session running `herd monit`; killed on drop.
pub struct Pane {
    session: String,
    /// Holds the server's socket, `tmux.sock`.
    dir: TempDir,
}

impl Pane {
    /// `herd monit` with `HERD_HOME=home`; `None` when tmux is not installed (a failure
    /// under CI).
    pub fn start(home: &std::path::Path) -> Option<Pane> {
        Pane::run(home, &["monit"])
    }

    /// `herd ARGS…` with `HERD_HOME=home` (ARGS without spaces or quotes).
    pub fn run(home: &std::path::Path, args: &[&str]) -> Option<Pane> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        if Command::new("tmux").arg("-V").output().is_err() {
            prerequisite_missing("tmux (apt-get install tmux)");
            return None;
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pane = Pane {
            session: format!("monit{n}"),
            dir: TempDir::new(),
        };
        let home_var = format!("HERD_HOME={}", home.display());
        let bin_var = format!("MONIT_HERD={}", herd_bin());
        let args_var = format!("MONIT_ARGS={}", args.join(" "));
        let out = pane.tmux(&[
            "new-session",
            "-d",
            "-s",
            &pane.session,
            "-x",
            "160",
            "-y",
            "45",
            "-e",
            &home_var,
            "-e",
            &bin_var,
            "-e",
            &args_var,
            "sh",
            "-c",
            PANE_SCRIPT,
        ]);
        assert!(out.status.success(), "tmux new-session: {out:?}");
        Some(pane)
    }

    pub fn tmux(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(self.dir.join("tmux.sock"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tmux")
    }

    pub fn screen(&self) -> String {
        let out = self.tmux(&["capture-pane", "-p", "-t", &self.session]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (bounded by [`WAIT`]) until the screen shows what `done` wants.
    pub fn wait(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let screen = self.screen();
            if done(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {WAIT:?} waiting for the pane to show {what}; it shows:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", self.session.as_str()];
        args.extend_from_slice(keys);
        assert!(self.tmux(&args).status.success(), "send-keys {keys:?}");
    }

    pub fn display(&self, format: &str) -> String {
        let out = self.tmux(&["display-message", "-p", "-t", &self.session, format]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Pane {
    /// Kills the session: its processes get SIGHUP, as when a terminal window closes.
    pub fn kill(&self) {
        let _ = self.tmux(&["kill-session", "-t", &self.session]);
    }
}

impl Drop for Pane {
    fn drop(&mut self) {
        self.kill();
    }
}
