//! Hardening: the unix-socket paths and ports a Node worker asks herd to listen on.
//!
//! herd runs as root here and the worker as `--user nobody`; the worker
//! (`fixtures/paths_hostile.js`) asks for what it could not get alone. Whatever herd does
//! for it must be what the worker could do itself: a path it may not create in is refused,
//! a socket file is removed only if it is still the one herd made, a live socket of any
//! type is never taken for a stale one, and a privileged port is refused.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::util::{fixture, poll_until, Herd, TempDir};

const NOBODY: u32 = 65534;

/// True when this test can run (we are root); otherwise skips loudly, or fails under CI.
fn root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert_ne!(
        std::env::var("CI").as_deref(),
        Ok("true"),
        "{test} needs root (it runs herd with --user nobody); CI must run it as root"
    );
    eprintln!("SKIPPED {test}: needs root (herd --user nobody); run the suite as root");
    false
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// A directory owned by nobody.
fn nobody_dir(path: &Path) {
    std::fs::create_dir(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    chmod(path, 0o755);
    std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).expect("chown");
}

/// A directory only root may enter.
fn root_only_dir(path: &Path) {
    std::fs::create_dir(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    chmod(path, 0o700);
}

/// `herd run --user nobody -i 1 -e K=V… fixtures/paths_hostile.js`.
fn hostile(env: &[(&str, String)]) -> Herd {
    let app = fixture("paths_hostile.js");
    let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut args = vec!["--user", "nobody", "-i", "1"];
    for e in &env {
        args.extend(["-e", e.as_str()]);
    }
    args.push(&app);
    Herd::start(&args)
}

/// The worker's next `paths: {…}` report from event index `from` on.
fn report(herd: &Herd, from: usize) -> Value {
    let line = herd.wait_line_after(from, "paths: ");
    let text = line["line"].as_str().unwrap_or_default();
    let json = text.split_once("paths: ").map_or("", |(_, j)| j);
    serde_json::from_str(json).unwrap_or_else(|e| panic!("bad report {text:?}: {e}"))
}

/// (a) The worker listens in a directory of its own, swaps that directory for a symlink to
/// a root-only directory holding a root-owned file of the socket's name, and closes its
/// server. herd removes its own socket (where it really is), never the root-owned file.
#[test]
fn closing_a_server_after_swapping_its_directory_for_a_symlink_removes_nothing_else() {
    if !root("closing_a_server_after_swapping…") {
        return;
    }
    let base = TempDir::new();
    chmod(base.path(), 0o755);
    let w = base.join("w");
    nobody_dir(&w);
    let own = w.join("own");
    nobody_dir(&own);
    let secret = base.join("secret");
    root_only_dir(&secret);
    let precious = secret.join("s.sock");
    std::fs::write(&precious, b"root's file\n").expect("write");
    let sock = own.join("s.sock");

    let herd = hostile(&[
        ("MODE", "swap".into()),
        ("SOCK", sock.display().to_string()),
        ("SWAP_DIR", own.display().to_string()),
        ("SWAP_TO", secret.display().to_string()),
    ]);
    let listening = report(&herd, 0);
    assert_eq!(listening["event"], "listening", "{}", herd.dump());
    herd.wait_named("closed");
    // herd removes the socket it made, in the directory it made it in (now `own.old`).
    let moved = w.join("own.old").join("s.sock");
    poll_until("herd to remove its socket (or the root-owned file)", || {
        (!moved.exists() || !precious.exists()).then_some(())
    });
    assert!(
        precious.exists(),
        "herd followed the worker's symlink and deleted root's {}\n{}",
        precious.display(),
        herd.dump()
    );
    assert_eq!(
        std::fs::read(&precious).expect("read"),
        b"root's file\n",
        "untouched"
    );
    assert!(!moved.exists(), "herd removed the socket it made");
    assert_eq!(
        listening["uid"], NOBODY,
        "the socket file is made with the worker's rights, so it is the worker's"
    );
}

/// (b) A root-only directory: the worker could not create a socket there, so herd does not.
#[test]
fn listening_in_a_root_only_directory_is_refused_as_eacces() {
    if !root("listening_in_a_root_only_directory…") {
        return;
    }
    let base = TempDir::new();
    chmod(base.path(), 0o755);
    let private = base.join("private");
    root_only_dir(&private);
    let sock = private.join("s.sock");
    let herd = hostile(&[("SOCK", sock.display().to_string())]);
    let outcome = report(&herd, 0);
    assert_eq!(outcome["event"], "error", "{outcome}\n{}", herd.dump());
    assert_eq!(outcome["code"], "EACCES", "{outcome}");
    let refused = herd.wait_named("listen_error");
    assert_eq!(refused["errno"], -libc::EACCES, "{refused}");
    assert!(
        std::fs::symlink_metadata(&sock).is_err(),
        "herd created {} for a worker that may not",
        sock.display()
    );
}

/// (c) A live datagram socket at the path is in use, not stale: it stays, and the worker
/// gets EADDRINUSE as it would alone.
#[test]
fn a_live_datagram_socket_at_the_path_is_left_alone() {
    if !root("a_live_datagram_socket_at_the_path…") {
        return;
    }
    let base = TempDir::new();
    chmod(base.path(), 0o755);
    let w = base.join("w");
    nobody_dir(&w);
    let sock = w.join("d.sock");
    let live = UnixDatagram::bind(&sock).expect("bind the datagram socket");
    // Writable by all, so a connect as nobody reaches it (and finds it alive).
    chmod(&sock, 0o666);
    let inode = std::fs::symlink_metadata(&sock).expect("stat").ino();
    let herd = hostile(&[("SOCK", sock.display().to_string())]);
    let outcome = report(&herd, 0);
    assert_eq!(outcome["event"], "error", "{outcome}\n{}", herd.dump());
    assert_eq!(outcome["code"], "EADDRINUSE", "{outcome}");
    let meta = std::fs::symlink_metadata(&sock).expect("the socket file is still there");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.ino(), inode, "the same socket file, not a new one");
    let client = UnixDatagram::unbound().expect("client");
    client
        .send_to(b"ping", &sock)
        .expect("send to the live socket");
    live.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    let n = live.recv(&mut buf).expect("the datagram arrives");
    assert_eq!(&buf[..n], b"ping");
}

/// (d) A privileged port, TCP or UDP, from a worker that runs as nobody: EACCES, nothing
/// bound.
#[test]
fn a_privileged_port_is_refused_to_an_unprivileged_worker() {
    if !root("a_privileged_port_is_refused…") {
        return;
    }
    let start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024);
    if start < 1000 {
        eprintln!("SKIPPED: ip_unprivileged_port_start is {start}; port 999 is not privileged");
        return;
    }
    for mode in ["listen", "udp"] {
        let herd = hostile(&[("MODE", mode.into()), ("PORT", "999".into())]);
        let outcome = report(&herd, 0);
        assert_eq!(
            outcome["event"],
            "error",
            "{mode}: {outcome}\n{}",
            herd.dump()
        );
        assert_eq!(outcome["code"], "EACCES", "{mode}: {outcome}");
        let refused = herd.wait_named("listen_error");
        assert_eq!(refused["errno"], -libc::EACCES, "{mode}: {refused}");
        assert!(
            herd.events().iter().all(|e| e["event"] != "bound"),
            "{mode}: herd bound a privileged port for nobody\n{}",
            herd.dump()
        );
    }
}
