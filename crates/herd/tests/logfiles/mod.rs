//! `--log-file`: one file for every instance, rotation (with gzip), reopen on SIGUSR1, a
//! full disk that costs lines but never routing, and `herd logs` from the file once the
//! supervisor is gone. Apps run detached (`herd start`), as in production; [`App`] stops
//! them and kills what they started on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{
    cli, fixture, get, kill, pid_alive, poll_until, prerequisite_missing, status, wait_dead,
    workers, CliOutput, TempDir, WAIT,
};

/// A detached app in a home of its own.
struct App {
    home: TempDir,
    name: String,
    pids: Vec<u32>,
}

impl App {
    /// `herd start -i N --listen 127.0.0.1:0 --name NAME EXTRA… python3 logfiles_app.py`.
    fn start(name: &str, instances: usize, extra: &[&str]) -> App {
        let app = App {
            home: TempDir::new(),
            name: name.to_string(),
            pids: Vec::new(),
        };
        app.start_again(instances, extra)
    }

    fn start_again(mut self, instances: usize, extra: &[&str]) -> App {
        let n = instances.to_string();
        let script = fixture("logfiles_app.py");
        let mut args = vec![
            "start",
            "-i",
            &n,
            "--listen",
            "127.0.0.1:0",
            "--name",
            &self.name,
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["python3", &script]);
        self.cli(&args).assert_ok();
        self.remember_pids();
        self
    }

    fn home(&self) -> PathBuf {
        self.home.join("home")
    }

    fn cli(&self, args: &[&str]) -> CliOutput {
        cli(&self.home(), args)
    }

    fn status(&self) -> Value {
        status(&self.home(), &self.name)
    }

    fn remember_pids(&mut self) {
        let s = self.status();
        self.pids.push(s["pid"].as_u64().expect("pid") as u32);
        for w in workers(&s) {
            if let Some(pid) = w["pid"].as_u64().filter(|&p| p != 0) {
                self.pids.push(pid as u32);
            }
        }
    }

    fn supervisor(&self) -> u32 {
        self.status()["pid"].as_u64().expect("pid") as u32
    }

    fn port(&self) -> u16 {
        let s = self.status();
        let listen = s["listen"][0].as_str().expect("listen").to_string();
        listen
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port")
    }

    /// Worker pids by instance.
    fn worker_pids(&self) -> Vec<(u64, u64)> {
        workers(&self.status())
            .iter()
            .map(|w| {
                (
                    w["instance"].as_u64().expect("i"),
                    w["pid"].as_u64().expect("pid"),
                )
            })
            .collect()
    }

    fn stop(&self) {
        self.cli(&["stop", &self.name]).assert_ok();
    }

    /// `herd logs NAME ARGS…`, which must succeed.
    fn logs(&self, args: &[&str]) -> String {
        let mut all = vec!["logs", self.name.as_str()];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        out.assert_ok();
        out.stdout
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = crate::util::spawn_cli(&self.home(), &["stop", &self.name]).finish(WAIT);
        for &pid in &self.pids {
            if pid_alive(pid) {
                kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// The file's text, or empty while it does not exist.
fn read(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn wait_file(path: &Path, what: &str, done: impl Fn(&str) -> bool) -> String {
    poll_until(what, || {
        let text = read(path);
        done(&text).then_some(text)
    })
}

#[test]
fn two_instances_write_one_file_with_instance_and_pid() {
    // herd writes HERD_HOME/NAME.log itself (not its stdout sent there), so it rotates.
    let app = App::start("lf-two", 2, &["-e", "TICK_MS=20", "--log-max-size", "1K"]);
    let file = app.home().join("lf-two.log");
    let pids = app.worker_pids();
    for (instance, pid) in &pids {
        let line = format!("lf-two[{instance}] {pid} | hello from {instance} pid {pid}");
        wait_file(&file, &line, |t| t.lines().any(|l| l == line));
    }
    let text = read(&file);
    assert!(
        text.contains("herd: lf-two "),
        "herd's own events go to the file too:\n{text}"
    );
    let rotated = app.home().join("lf-two.log.1");
    poll_until("HERD_HOME/lf-two.log.1", || rotated.exists().then_some(()));
    app.stop();
    let text = read(&file);
    assert!(text.trim_end().ends_with("herd: lf-two stopped"), "{text}");
}

#[test]
fn json_log_file_lines_carry_instance_and_pid() {
    let dir = TempDir::new();
    let path = dir.join("json.log");
    let shown = path.to_string_lossy().into_owned();
    let app = App::start(
        "lf-json",
        2,
        &["--log-format", "json", "--log-file", &shown],
    );
    let pids = app.worker_pids();
    let text = wait_file(&path, "both hellos", |t| {
        t.lines().filter(|l| l.contains("hello from")).count() >= 2
    });
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["app"], "lf-json", "{line}");
    }
    for (instance, pid) in pids {
        let hello = format!("hello from {instance} pid {pid}");
        assert!(
            text.lines().any(|l| {
                let v: Value = serde_json::from_str(l).expect("json");
                v["line"] == hello.as_str() && v["instance"] == instance && v["pid"] == pid
            }),
            "no JSON line {hello:?} with instance and pid:\n{text}"
        );
    }
    assert!(
        !app.home().join("lf-json.log").exists(),
        "--log-file replaces HERD_HOME/NAME.log"
    );
}

/// `python3 -c 'gzip…' FILE`: the decompressed text (python3 is installed wherever the
/// tests run: the fixtures need it).
fn gunzip(path: &Path) -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "import gzip,sys; sys.stdout.buffer.write(gzip.open(sys.argv[1]).read())",
        ])
        .arg(path)
        .output()
        .expect("python3");
    assert!(out.status.success(), "gunzip {}: {out:?}", path.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn rotation_keeps_n_gzipped_files_of_at_most_the_size() {
    let app = App::start(
        "lf-rot",
        2,
        &[
            "-e",
            "TICK_MS=5",
            "--log-max-size",
            "2K",
            "--log-keep",
            "2",
            "--log-compress",
        ],
    );
    let home = app.home();
    poll_until("lf-rot.log.1.gz and lf-rot.log.2.gz", || {
        (home.join("lf-rot.log.1.gz").exists() && home.join("lf-rot.log.2.gz").exists())
            .then_some(())
    });
    app.stop();
    let mut rotated: Vec<String> = std::fs::read_dir(&home)
        .expect("read home")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("lf-rot.log.") && !n.contains(".gz-"))
        .collect();
    rotated.sort();
    for k in 1..=2 {
        let plain = format!("lf-rot.log.{k}");
        let gz = format!("lf-rot.log.{k}.gz");
        assert!(
            rotated.contains(&plain) != rotated.contains(&gz),
            "one file for rotation {k}: {rotated:?}"
        );
    }
    assert_eq!(rotated.len(), 2, "--log-keep 2: {rotated:?}");
    let mut zipped = 0;
    for name in &rotated {
        let text = if name.ends_with(".gz") {
            zipped += 1;
            gunzip(&home.join(name))
        } else {
            read(&home.join(name))
        };
        assert!(text.len() <= 2048, "{name} is {} bytes", text.len());
        assert!(
            text.len() > 1024,
            "{name} was cut early: {} bytes",
            text.len()
        );
        for line in text.lines() {
            assert!(
                line.starts_with("lf-rot[") || line.starts_with("herd: lf-rot"),
                "{name}: {line}"
            );
        }
        assert!(text.contains("| tick "), "{name}:\n{text}");
    }
    assert!(zipped >= 1, "nothing compressed: {rotated:?}");
    assert!(read(&home.join("lf-rot.log")).len() <= 2048);
}

#[test]
fn sigusr1_reopens_the_file_after_logrotate_renamed_it() {
    let app = App::start("lf-usr1", 1, &["-e", "TICK_MS=20", "--log-max-size", "0"]);
    let home = app.home();
    let file = home.join("lf-usr1.log");
    let old = home.join("lf-usr1.log.old");
    wait_file(&file, "a tick", |t| t.contains("| tick "));
    std::fs::rename(&file, &old).expect("rename like logrotate");
    kill(app.supervisor(), libc::SIGUSR1);
    let text = wait_file(&file, "ticks in the new file", |t| {
        t.lines().filter(|l| l.contains("| tick ")).count() >= 3
    });
    assert!(
        text.lines().next().is_some_and(|l| l.contains("reopened")),
        "{text}"
    );
    // Ticks go to the new file only now: the old one stops growing.
    let before = read(&old).len();
    let count = text.lines().count();
    wait_file(&file, "more ticks", |t| t.lines().count() >= count + 5);
    assert_eq!(
        read(&old).len(),
        before,
        "lines still went to the renamed file"
    );
    assert!(app.status()["state"] == "running");
}

/// A worker floods stdout while the log file's filesystem is full (a 64k tmpfs mounted in
/// a mount namespace of herd's own): herd drops lines, says how many and why, and routes
/// every request.
#[test]
fn a_full_disk_drops_lines_with_a_count_and_never_stops_routing() {
    if !rustix::process::geteuid().is_root() {
        prerequisite_missing("root, to mount a small tmpfs in a mount namespace");
        return;
    }
    if Command::new("unshare").arg("--version").output().is_err() {
        prerequisite_missing("unshare (util-linux)");
        return;
    }
    let mut app = App {
        home: TempDir::new(),
        name: "lf-full".into(),
        pids: Vec::new(),
    };
    let disk = app.home.join("disk");
    std::fs::create_dir_all(&disk).expect("mkdir");
    let log = disk.join("lf-full.log");
    let script = fixture("logfiles_app.py");
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o size=64k tmpfs "$1" && shift && exec "$@""#)
        .arg("sh")
        .arg(&disk)
        .arg(crate::util::herd_bin())
        .args([
            "start",
            "-i",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--name",
            "lf-full",
        ])
        .args(["-e", "FLOOD=1", "--log-max-size", "0", "--log-file"])
        .arg(&log)
        .args(["python3", &script])
        .env("HERD_HOME", app.home())
        .env_remove("LISTEN_FDS")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null());
    let out = crate::util::spawn_command(cmd, &["start (in a mount namespace)"]).finish(WAIT);
    out.assert_ok();
    app.remember_pids();
    let report = poll_until("a `lines dropped` report in herd logs", || {
        let text = app.logs(&["-n", "2000"]);
        text.lines()
            .find(|l| l.contains("lines dropped: No space left on device"))
            .map(str::to_string)
    });
    let n: u64 = report
        .split("lf-full ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {report:?}"));
    assert!(n > 0, "{report}");
    let port = app.port();
    let started = Instant::now();
    for i in 0..20 {
        let r = get(port, "/").unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        assert_eq!(r.status, 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "20 requests took {:?}",
        started.elapsed()
    );
    assert_eq!(app.status()["state"], "running");
    assert!(
        !log.exists(),
        "the tmpfs is herd's own: this test does not see it"
    );
}

#[test]
fn herd_logs_reads_the_file_after_stop_and_after_kill_9() {
    let app = App::start("lf-gone", 2, &["-e", "TICK_MS=50"]);
    let file = app.home().join("lf-gone.log");
    wait_file(&file, "ticks", |t| t.matches("| tick ").count() >= 4);
    app.stop();
    let text = app.logs(&["-n", "3"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[2], "herd: lf-gone stopped", "{text}");
    let one = app.logs(&["-n", "2", "--instance", "1"]);
    assert!(
        one.lines().all(|l| l.contains("lf-gone[1]")) && one.lines().count() == 2,
        "{one}"
    );

    let app = app.start_again(1, &["-e", "TICK_MS=50"]);
    let sup = app.supervisor();
    let mark = read(&file).len();
    wait_file(&file, "ticks of the second run", |t| {
        t.get(mark..)
            .is_some_and(|new| new.matches("| tick ").count() >= 3)
    });
    kill(sup, libc::SIGKILL);
    assert!(wait_dead(sup, WAIT), "the supervisor survived SIGKILL");
    let text = app.logs(&["-n", "2"]);
    let last = read(&file);
    let expected: Vec<&str> = last.lines().rev().take(2).collect();
    let got: Vec<&str> = text.lines().rev().collect();
    assert_eq!(got, expected, "herd logs after kill -9:\n{text}");
    assert!(text.contains("| tick "), "{text}");
}

#[test]
fn herd_logs_follows_the_file_across_rotations() {
    let app = App::start("lf-follow", 1, &[]);
    app.stop();
    // No supervisor: `herd logs -f` follows the file; the next run rotates it under it.
    let out_dir = TempDir::new();
    let out_path = out_dir.join("follow.out");
    let out = std::fs::File::create(&out_path).expect("create");
    let mut follower =
        crate::util::cli_command(&app.home(), &["logs", "lf-follow", "-n", "1", "-f"])
            .stdout(out)
            .spawn()
            .expect("herd logs -f");
    wait_file(&out_path, "the last line of the first run", |t| {
        t.contains("stopped")
    });
    let app = app.start_again(
        1,
        &[
            "-e",
            "TICK_MS=20",
            "--log-max-size",
            "2K",
            "--log-keep",
            "10",
        ],
    );
    let home = app.home();
    poll_until("three rotations", || {
        home.join("lf-follow.log.3").exists().then_some(())
    });
    app.stop();
    let text = wait_file(&out_path, "the second run's stop", |t| {
        t.matches("herd: lf-follow stopped").count() >= 2
    });
    let _ = follower.kill();
    let _ = follower.wait();
    let ticks: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split("| tick ").nth(1))
        .filter_map(|t| t.split(' ').next()?.parse().ok())
        .collect();
    assert!(ticks.len() > 100, "{} ticks followed:\n{text}", ticks.len());
    for pair in ticks.windows(2) {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "a tick was lost following the file:\n{text}"
        );
    }
}
