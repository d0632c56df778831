//! `herd status NAME --watch` and `herd ls --watch` into a pipe: a new table every interval
//! after a line with the time, no ANSI; the watch ends with a message when the app stops.

use std::process::Stdio;
use std::time::{Duration, Instant};

use super::pane::Pane;
use super::{settled_pids, start_node};
use crate::util::{cli, cli_command, home_of, poll_until, spawn_command, TempDir, WAIT};

/// Polls a file until `done` holds for its text (bounded by [`WAIT`]).
fn wait_file(path: &std::path::Path, what: &str, done: impl Fn(&str) -> bool) -> String {
    poll_until(what, || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        done(&text).then_some(text)
    })
}

#[test]
fn status_watch_prints_a_table_per_interval_into_a_pipe_and_ends_when_the_app_stops() {
    let name = "monit-watch";
    let herd = start_node(name, 2, &[]);
    herd.wait_ready();
    let home = home_of(&herd);
    let pids = settled_pids(&home, name, 2);
    let dir = TempDir::new();
    let out_path = dir.join("watch.out");
    let file = std::fs::File::create(&out_path).expect("create the output file");
    let args = ["status", name, "--watch", "200ms"];
    let mut cmd = cli_command(&home, &args);
    cmd.stdout(Stdio::from(file));
    let run = spawn_command(cmd, &args);
    let text = wait_file(&out_path, "three tables", |t| {
        t.matches("--- ").count() >= 3 && t.matches(&pids[1].to_string()).count() >= 3
    });
    assert!(!text.contains('\x1b'), "no ANSI into a pipe: {text:?}");
    let stamps: Vec<&str> = text.lines().filter(|l| l.starts_with("--- ")).collect();
    assert!(
        stamps
            .iter()
            .all(|l| l.contains('T') && l.contains("every 200ms")),
        "{text}"
    );
    for pid in &pids {
        assert!(text.contains(&pid.to_string()), "{text}");
    }
    let started = Instant::now();
    cli(&home, &["stop", name]).assert_ok();
    let out = run.finish(WAIT);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("no longer running"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(15), "{out}");
}

#[test]
fn watch_refuses_a_busy_loop_and_an_app_that_is_not_running() {
    let dir = TempDir::new();
    let out = cli(dir.path(), &["ls", "--watch", "1ms"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("at least 100ms"), "{out}");
    let out = cli(dir.path(), &["status", "nothere", "--watch"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("no app named `nothere`"), "{out}");
}

#[test]
fn ls_watch_repeats_the_table_of_every_app() {
    let name = "monit-lswatch";
    let herd = start_node(name, 1, &[]);
    herd.wait_ready();
    let home = home_of(&herd);
    settled_pids(&home, name, 1);
    let dir = TempDir::new();
    let out_path = dir.join("ls.out");
    let file = std::fs::File::create(&out_path).expect("create the output file");
    let args = ["ls", "--watch", "200ms"];
    let mut cmd = cli_command(&home, &args);
    cmd.stdout(Stdio::from(file));
    let run = spawn_command(cmd, &args);
    wait_file(&out_path, "two tables naming the app", |t| {
        t.matches(name).count() >= 2 && t.matches("--- ").count() >= 2
    });
    // Killed on drop: `ls --watch` runs until Ctrl-C.
    drop(run);
}

#[test]
fn status_watch_on_a_terminal_redraws_in_place() {
    let name = "monit-watch-tty";
    let herd = start_node(name, 1, &[]);
    herd.wait_ready();
    let home = home_of(&herd);
    let pids = settled_pids(&home, name, 1);
    let Some(pane) = Pane::run(&home, &["status", name, "--watch", "200ms"]) else {
        return;
    };
    let pid = pids[0].to_string();
    pane.wait("the table", |s| s.contains(&pid));
    // Later rounds replace the first: one table on the screen, no timestamp lines.
    let started = Instant::now();
    let uptime = |s: &str| s.lines().find(|l| l.contains(&pid)).map(str::to_string);
    let first = uptime(&pane.screen());
    let screen = pane.wait("a later round", |s| {
        uptime(s) != first && started.elapsed() > Duration::from_millis(600)
    });
    assert_eq!(screen.matches(&pid).count(), 1, "{screen}");
    assert!(!screen.contains("--- "), "{screen}");
    // Dropping the pane ends it: `--watch` runs until Ctrl-C or a hangup.
}
