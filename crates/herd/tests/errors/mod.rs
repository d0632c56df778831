//! Start-up errors: one `error: …` line on stderr that says what is wrong, exit 2 for a
//! usage error and 1 for anything else, nothing started and nothing left behind.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;

use crate::run::start_inherit_on;
use crate::util::{fixture, run_to_end, TempDir};

/// Runs herd with `args`, expects exit `code` and one stderr line starting with `error:`
/// that contains every piece of `expected`. Returns the line.
fn expect_error(args: &[&str], code: i32, expected: &[&str]) -> String {
    let (out, home) = run_to_end(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "herd {args:?}: stdout {stdout:?} stderr {stderr:?}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "one line on stderr for {args:?}: {stderr:?}"
    );
    let line = lines[0];
    assert!(line.starts_with("error:"), "{line}");
    for piece in expected {
        assert!(
            line.contains(piece),
            "{args:?}: {line:?} should mention {piece:?}"
        );
    }
    assert!(
        stdout.is_empty(),
        "nothing on stdout for {args:?}: {stdout:?}"
    );
    // Nothing left in herd's home (its run directory is removed on a start-up error).
    let leftovers: Vec<_> = std::fs::read_dir(home.join("home"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "{args:?} left {leftovers:?} in HERD_HOME"
    );
    eprintln!("{args:?} → exit {code}: {line}");
    line.to_string()
}

#[test]
fn a_program_that_does_not_exist_is_named() {
    expect_error(
        &["herd-test-no-such-program"],
        1,
        &["herd-test-no-such-program", "not found"],
    );
    expect_error(
        &["/nonexistent/dir/prog"],
        1,
        &["/nonexistent/dir/prog", "does not exist"],
    );
    expect_error(
        &["/nonexistent/app.py"],
        1,
        &["/nonexistent/app.py", "does not exist"],
    );
}

#[test]
fn a_program_that_is_not_executable_is_named() {
    let dir = TempDir::new();
    let path = dir.join("server");
    std::fs::write(&path, "#!/bin/sh\nexit 0\n").expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let path = path.to_string_lossy().into_owned();
    expect_error(&[&path], 1, &[&path, "not executable"]);
}

#[test]
fn a_listen_address_in_use_is_named() {
    let held = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr").to_string();
    let app = fixture("inherit.py");
    expect_error(
        &["-i", "1", "--listen", &addr, &app],
        1,
        &[&addr, "already in use"],
    );
}

#[test]
fn a_malformed_listen_address_is_a_usage_error() {
    let app = fixture("inherit.py");
    expect_error(
        &["--listen", "nonsense", &app],
        2,
        &["--listen", "nonsense"],
    );
    expect_error(
        &["--listen", "127.0.0.1:http", &app],
        2,
        &["--listen", "not a port"],
    );
    expect_error(
        &["--listen", "70000", &app],
        2,
        &["--listen", "out of range"],
    );
}

#[test]
fn zero_or_non_numeric_instances_are_usage_errors() {
    let app = fixture("inherit.py");
    expect_error(
        &["--instances", "0", &app],
        2,
        &["--instances", "at least 1"],
    );
    expect_error(
        &["--instances", "abc", &app],
        2,
        &["--instances", "abc", "not a number"],
    );
}

#[test]
fn a_unix_socket_path_that_is_too_long_is_a_usage_error() {
    let app = fixture("inherit.py");
    let long = format!("unix:/tmp/{}/s.sock", "d".repeat(120));
    expect_error(&["--listen", &long, &app], 2, &["--listen", "longer than"]);
}

#[test]
fn a_unix_socket_in_a_missing_directory_is_named() {
    let dir = TempDir::new();
    let missing = dir.join("missing");
    let listen = format!("unix:{}/s.sock", missing.display());
    let app = fixture("inherit.py");
    expect_error(
        &["-i", "1", "--listen", &listen, &app],
        1,
        &[&missing.to_string_lossy(), "does not exist"],
    );
}

#[test]
fn a_duration_without_a_unit_is_a_usage_error() {
    let app = fixture("inherit.py");
    expect_error(
        &["--kill-timeout", "5", &app],
        2,
        &["--kill-timeout", "no unit"],
    );
}

#[test]
fn a_unix_socket_held_by_a_running_herd_is_not_stolen() {
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let listen = format!("unix:{}", sock.display());
    let first = start_inherit_on(&listen, 1, &[]);
    first.wait_ready();
    let app = fixture("inherit.py");
    expect_error(&["-i", "1", "--listen", &listen, &app], 1, &["in use"]);
    assert!(
        sock.exists(),
        "the second herd must not remove the first one's socket"
    );
    drop(first);
}
