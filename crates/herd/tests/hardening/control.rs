//! Hardening of app names, `HERD_HOME` and the control socket, each test as the attacker:
//! a name that is a path, odd entries planted in `HERD_HOME`, a second supervisor of a
//! name, and control clients that flood, stall, send garbage or never read.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{
    cli, cli_command, fixture, home_of, start_named_listener, status, wait_status, CliOutput, Herd,
    TempDir, WAIT,
};

/// herd's cap on control connections (control::MAX_CLIENTS).
const MAX_CLIENTS: usize = 32;

/// A regular file standing where a `../NAME` would put a control socket.
fn victim(path: &Path) {
    std::fs::write(path, b"precious").expect("write victim");
}

fn assert_intact(path: &Path, what: &str) {
    let meta = std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{what}: {} is gone ({e})", path.display()));
    if meta.file_type().is_file() {
        assert_eq!(
            std::fs::read(path).expect("read"),
            b"precious",
            "{what}: {} was changed",
            path.display()
        );
    }
}

/// The app's control socket.
fn socket(herd: &Herd, name: &str) -> PathBuf {
    home_of(herd).join(format!("{name}.sock"))
}

fn start(name: &str) -> Herd {
    let herd = start_named_listener("control_server.py", name, 1, &[]);
    herd.wait_ready();
    herd
}

/// A raw control connection, with bounded reads and writes.
fn connect(socket: &Path) -> UnixStream {
    let stream =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream.set_write_timeout(Some(WAIT)).expect("timeout");
    stream
}

/// The next answer line: `Ok(None)` when herd closed the connection without one.
fn answer(stream: &UnixStream) -> std::io::Result<Option<Value>> {
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        return Ok(None);
    }
    Ok(Some(serde_json::from_str(&line).unwrap_or_else(|e| {
        panic!("answer {line:?} is not JSON: {e}")
    })))
}

fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// The state letter of `pid` (`R` running or runnable, `S` sleeping, …).
fn proc_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    stat[stat.rfind(')').expect("comm") + 2..]
        .chars()
        .next()
        .unwrap_or('?')
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .count()
}

/// `herd ARGS…` that may run on (a supervisor): waits up to `timeout` for it to exit; if it
/// does not, stops it with SIGTERM (so its workers go too) and panics.
fn run_bounded(home: &Path, args: &[&str], timeout: Duration) -> CliOutput {
    let started = Instant::now();
    let mut child: Child = cli_command(home, args)
        .stdin(Stdio::null())
        .spawn()
        .expect("start herd");
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = started + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let Some(status) = status else {
        // SAFETY: kill(2) on the child this test started and has not reaped.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let end = Instant::now() + WAIT;
        while child.try_wait().expect("try_wait").is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "herd {args:?} was still running after {timeout:?} (stopped it)\nstderr: {}",
            err.join().unwrap_or_default()
        );
    };
    CliOutput {
        args: args.iter().map(|s| s.to_string()).collect(),
        code: status.code(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        took: started.elapsed(),
    }
}

/// Every command that takes a name refuses one that is a path, before touching any file:
/// the `*.sock` file it would name outside `HERD_HOME` survives, and `HERD_HOME` is not even
/// created.
#[test]
fn names_that_are_paths_touch_nothing() {
    let dir = TempDir::new();
    let home = dir.join("home");
    let app = fixture("control_server.py");
    let abs = |v: &str| dir.join(v).to_string_lossy().into_owned();
    let cases: Vec<(String, Vec<String>)> = vec![
        (
            "v_run".into(),
            vec![
                "run".into(),
                "--name".into(),
                "../v_run".into(),
                app.clone(),
            ],
        ),
        (
            "v_start".into(),
            vec!["start".into(), "--name".into(), abs("v_start"), app.clone()],
        ),
        (
            "v_status".into(),
            vec!["status".into(), "../v_status".into()],
        ),
        ("v_stop".into(), vec!["stop".into(), abs("v_stop")]),
        (
            "v_reload".into(),
            vec!["reload".into(), "../v_reload".into()],
        ),
        (
            "v_restart".into(),
            vec!["restart".into(), "../v_restart".into()],
        ),
        (
            "v_scale".into(),
            vec!["scale".into(), "../v_scale".into(), "+1".into()],
        ),
        ("v_logs".into(), vec!["logs".into(), "../v_logs".into()]),
        (
            "v_send".into(),
            vec!["send".into(), abs("v_send"), "1".into()],
        ),
    ];
    for (file, args) in &cases {
        let target = dir.join(&format!("{file}.sock"));
        victim(&target);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_bounded(&home, &args, WAIT);
        assert_intact(&target, &format!("herd {args:?}"));
        assert_ne!(out.code, Some(0), "{out}");
        assert!(
            out.stderr.contains("not an app name") && out.stderr.contains("letters, digits"),
            "the error names the rule\n{out}"
        );
    }
    assert!(
        !home.exists(),
        "HERD_HOME was created for a command with an invalid name"
    );
}

/// `herd ls`, `status` and `stop` leave alone what they did not create: a regular file, a
/// link to a file elsewhere, a directory and a dead socket named `*.sock` in `HERD_HOME`.
/// Only a supervisor of that name replaces a dead socket, and never anything else.
#[test]
fn odd_entries_in_herd_home_are_left_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new();
    let home = dir.join("home");
    std::fs::create_dir(&home).expect("mkdir");
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let target = dir.join("target");
    victim(&target);
    victim(&home.join("junk.sock"));
    std::os::unix::fs::symlink(&target, home.join("link.sock")).expect("symlink");
    std::fs::create_dir(home.join("dir.sock")).expect("mkdir");
    drop(UnixListener::bind(home.join("dead.sock")).expect("bind"));
    let entries = ["junk.sock", "link.sock", "dir.sock", "dead.sock"];

    cli(&home, &["ls"]).assert_ok();
    cli(&home, &["ls", "--json"]).assert_ok();
    for name in ["junk", "link", "dir", "dead"] {
        let out = cli(&home, &["status", name]);
        assert_ne!(out.code, Some(0), "{out}");
        let out = cli(&home, &["stop", name]);
        assert_ne!(out.code, Some(0), "{out}");
    }
    for e in entries {
        assert_intact(&home.join(e), &format!("after ls/status/stop: {e}"));
    }
    assert_intact(&target, "the link's target");

    // A supervisor refuses a name whose socket path holds something else.
    let app = fixture("control_server.py");
    for name in ["junk", "link", "dir"] {
        let out = run_bounded(
            &home,
            &[
                "run",
                "--name",
                name,
                "--listen",
                "127.0.0.1:0",
                "-i",
                "1",
                &app,
            ],
            WAIT,
        );
        assert_ne!(out.code, Some(0), "{out}");
        assert!(
            out.stderr.contains("not a control socket of yours"),
            "{out}"
        );
    }
    for e in ["junk.sock", "link.sock", "dir.sock"] {
        assert_intact(&home.join(e), &format!("after run --name: {e}"));
    }
    assert_intact(&target, "the link's target");

    // And replaces a dead socket of its own name.
    let mut run = cli_command(
        &home,
        &[
            "run",
            "--name",
            "dead",
            "--listen",
            "127.0.0.1:0",
            "-i",
            "1",
            &app,
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("start herd");
    let end = Instant::now() + WAIT;
    let s = loop {
        let out = cli(&home, &["status", "dead", "--json"]);
        if let Ok(s) = serde_json::from_str::<Value>(&out.stdout) {
            if s["ready"] == 1 {
                break s;
            }
        }
        if Instant::now() >= end || run.try_wait().expect("try_wait").is_some() {
            let _ = run.kill();
            let _ = run.wait();
            panic!(
                "the new supervisor of `dead` never answered
{out}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(s["pid"], run.id());
    cli(&home, &["stop", "dead"]).assert_ok();
    let end = Instant::now() + WAIT;
    while run.try_wait().expect("try_wait").is_none() {
        assert!(Instant::now() < end, "herd run --name dead did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A second `herd run --name same` is refused and the first keeps its socket and answers;
/// even when the first's socket has gone (deleted by someone), its lock still holds the name.
#[test]
fn a_second_supervisor_of_a_name_is_refused() {
    use std::os::unix::fs::MetadataExt;
    let name = "ctl-twice";
    let first = start(name);
    let home = home_of(&first);
    let sock = socket(&first, name);
    let inode = std::fs::metadata(&sock).expect("socket").ino();
    let app = fixture("control_server.py");
    let second = [
        "run",
        "--name",
        name,
        "--listen",
        "127.0.0.1:0",
        "-i",
        "1",
        &app,
    ];

    let out = run_bounded(&home, &second, WAIT);
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("already running"), "{out}");
    assert_eq!(
        std::fs::metadata(&sock).expect("socket survives").ino(),
        inode
    );
    assert_eq!(status(&home, name)["pid"], first.pid());

    std::fs::remove_file(&sock).expect("remove the socket");
    let out = run_bounded(&home, &second, WAIT);
    assert_ne!(out.code, Some(0), "{out}");
    assert!(
        out.stderr.contains("already running") && out.stderr.contains(&first.pid().to_string()),
        "the refusal names the supervisor that holds the name\n{out}"
    );
}

/// Out of descriptors, the accept loop waits instead of spinning: herd's CPU time stays low
/// while connections it cannot accept are queued, it says so once, and it recovers.
#[test]
fn emfile_does_not_spin_the_accept_loop() {
    let name = "ctl-emfile";
    let herd = start(name);
    let pid = herd.pid();
    let sock = socket(&herd, name);
    let home = home_of(&herd);
    let open = fd_count(pid) as u64;
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit on the herd this test started; the struct is valid.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit get");
    // Room for three more descriptors: a few clients are accepted, the rest cannot be.
    let low = libc::rlimit {
        rlim_cur: open + 3,
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &low, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit set");

    let clients: Vec<UnixStream> = (0..16).map(|_| connect(&sock)).collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    // The measurement window: herd's CPU time, and how often it is found runnable (a
    // spinning loop is runnable even when other processes get the CPU).
    let window = Duration::from_secs(3);
    let before = cpu_ticks(pid);
    let end = Instant::now() + window;
    let (mut samples, mut running) = (0, 0);
    while Instant::now() < end {
        samples += 1;
        if proc_state(pid) == 'R' {
            running += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let used = cpu_ticks(pid) - before;

    // SAFETY: as above; puts the limit back.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &old, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit restore");
    drop(clients);

    assert!(
        running * 4 <= samples,
        "herd was runnable in {running} of {samples} samples while out of descriptors"
    );
    let budget = hz * window.as_secs() / 10;
    assert!(
        used <= budget,
        "herd used {used} ticks of CPU in {window:?} out of descriptors (at most {budget}: 10%)"
    );
    let said = herd
        .events()
        .iter()
        .filter(|e| e["event"] == "control_error")
        .count();
    assert_eq!(
        said,
        1,
        "one control_error event per burst\n{}",
        herd.dump()
    );
    wait_status(&home, name, "status answers again", |s| s["ready"] == 1);
}

/// A request that is not UTF-8 gets an answer saying so (not a silent hang-up), and herd
/// goes on serving.
#[test]
fn a_non_utf8_request_is_answered() {
    let name = "ctl-bytes";
    let herd = start(name);
    let sock = socket(&herd, name);
    let mut stream = connect(&sock);
    stream
        .write_all(b"\xff\xfe{\"cmd\":\"status\"}\n")
        .expect("send");
    let reply = answer(&stream)
        .expect("an answer in time")
        .expect("an answer, not a hang-up");
    assert_eq!(reply["ok"], false, "{reply}");
    let message = reply["message"].as_str().unwrap_or_default();
    assert!(message.contains("UTF-8"), "{reply}");
    assert_eq!(status(&home_of(&herd), name)["pid"], herd.pid());
}

/// A client that connects and sends nothing blocks no one, and herd hangs up on it (with a
/// reason) instead of holding its connection forever.
#[test]
fn an_idle_client_is_dropped_and_blocks_no_one() {
    let name = "ctl-idle";
    let herd = start(name);
    let sock = socket(&herd, name);
    let idle = connect(&sock);
    assert_eq!(status(&home_of(&herd), name)["pid"], herd.pid());
    let started = Instant::now();
    match answer(&idle) {
        Ok(Some(reply)) => {
            assert_eq!(reply["ok"], false, "{reply}");
            let message = reply["message"].as_str().unwrap_or_default();
            assert!(message.contains("nothing"), "{reply}");
        }
        Ok(None) => {}
        Err(e) => panic!(
            "herd still held an idle client after {:?} ({e})",
            started.elapsed()
        ),
    }
}

/// Thousands of connections from the owner's own runaway script are capped: herd holds at
/// most its limit of them (the rest are told it is busy), and answers again once they go.
#[test]
fn a_connection_flood_is_capped() {
    let name = "ctl-flood-conn";
    let herd = start(name);
    let pid = herd.pid();
    let sock = socket(&herd, name);
    let base = fd_count(pid);
    let flood: Vec<UnixStream> = (0..200).map(|_| connect(&sock)).collect();
    // A last client, behind all of them in the queue: once it has an answer (busy, or the
    // status), herd has accepted every one before it.
    let mut last = connect(&sock);
    last.write_all(b"{\"cmd\":\"status\"}\n").expect("send");
    let reply = answer(&last).expect("in time").expect("an answer");
    let held = fd_count(pid).saturating_sub(base);
    assert!(
        held <= MAX_CLIENTS + 8,
        "herd holds {held} more descriptors for 200 idle control clients (cap {MAX_CLIENTS})"
    );
    assert!(
        reply["message"]
            .as_str()
            .is_some_and(|m| m.contains("busy")),
        "a client over the cap is told why: {reply}"
    );
    drop(flood);
    drop(last);
    // herd frees the slots as it notices the hang-ups: until then a status may still be told
    // "busy" (and only that); then it must answer again.
    let home = home_of(&herd);
    let deadline = Instant::now() + WAIT;
    loop {
        let out = cli(&home, &["status", name, "--json"]);
        if out.code == Some(0) {
            let s: Value = serde_json::from_str(&out.stdout).expect("status JSON");
            assert_eq!(s["ready"], 1, "{s:#}");
            break;
        }
        assert!(
            out.stderr.contains("busy"),
            "while the flood's slots are freed, only \"busy\" is a fair answer:\n{out}"
        );
        assert!(
            Instant::now() < deadline,
            "status still busy {WAIT:?} after the flood hung up:\n{out}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `herd logs -n 5000 -f` clients that never read, while a worker floods its output, do not
/// make herd hold a copy of its history each: its peak memory stays within a bound, and a
/// reader that does read still gets an answer (told what it misses).
#[test]
fn logs_readers_that_never_read_do_not_grow_herd() {
    let name = "ctl-slowlogs";
    let herd = Herd::start(&["-i", "1", "--name", name, &fixture("control_flood.py")]);
    herd.wait_line_after(0, "control flood filled");
    let pid = herd.pid();
    let home = home_of(&herd);
    let sock = socket(&herd, name);
    let before = proc_status_kb(pid, "VmHWM:");
    let request = b"{\"cmd\":\"logs\",\"lines\":5000,\"follow\":true,\"instance\":null}\n";
    let stalled: Vec<UnixStream> = (0..24)
        .map(|_| {
            let mut s = connect(&sock);
            s.write_all(request).expect("send");
            s
        })
        .collect();
    // Answered after herd has served every stalled client's request.
    assert_eq!(status(&home, name)["pid"], pid);
    let reader = cli(&home, &["logs", name, "-n", "5000"]);
    reader.assert_ok();
    let after = proc_status_kb(pid, "VmHWM:");
    let grown_mb = after.saturating_sub(before) / 1024;
    assert!(
        grown_mb < 40,
        "herd's peak memory grew by {grown_mb} MB for 24 stalled `logs -f` clients ({before} kB -> {after} kB)"
    );
    assert!(
        !reader.stdout.is_empty(),
        "the reading client got lines\n{reader}"
    );
    drop(stalled);
    assert_eq!(status(&home, name)["pid"], pid);
}
