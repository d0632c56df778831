//! `herd monit` in a real terminal: a tmux pane of a fixed size (see `pane.rs`), read with
//! `capture-pane` and driven with `send-keys`.

use std::time::{Duration, Instant};

use super::pane::Pane;
use super::{pids_by_instance, settled_pids, start_node};
use crate::util::{cli, home_of, wait_status, TempDir, WAIT};

fn shows_all(screen: &str, pids: &[u32]) -> bool {
    pids.iter().all(|p| screen.contains(&format!(" {p} ")))
}

#[test]
fn monit_shows_the_workers_restarts_one_scales_reloads_and_quits_restoring_the_terminal() {
    let name = "monit-tui";
    let herd = start_node(name, 2, &[]);
    herd.wait_ready();
    let home = home_of(&herd);
    let before = settled_pids(&home, name, 2);
    let Some(pane) = Pane::start(&home) else {
        return;
    };
    let screen = pane.wait("both worker pids", |s| shows_all(s, &before));
    assert!(screen.contains(&format!("{name} 2/2 running")), "{screen}");
    assert_eq!(
        pane.display("#{alternate_on}"),
        "1",
        "monit uses the alternate screen"
    );

    // R on the second worker: only that one is replaced.
    pane.keys(&["Tab", "R"]);
    let s = wait_status(&home, name, "instance 1 replaced", |s| {
        super::settled(s, 2) && pids_by_instance(s)[1] != before[1]
    });
    let after = pids_by_instance(&s);
    assert_eq!(
        after[0], before[0],
        "R replaced only the selected worker: {s:#}"
    );
    pane.wait("the new pid and the control answer", |screen| {
        shows_all(screen, &after) && screen.contains(&format!("restarted {name}[1]"))
    });

    // + adds a third worker.
    pane.keys(&["+"]);
    let three = settled_pids(&home, name, 3);
    pane.wait("three workers", |screen| {
        shows_all(screen, &three) && screen.contains(&format!("{name} 3/3"))
    });

    // r reloads: every pid replaced.
    pane.keys(&["r"]);
    let s = wait_status(&home, name, "every worker replaced", |s| {
        super::settled(s, 3) && pids_by_instance(s).iter().all(|p| !three.contains(p))
    });
    let reloaded = pids_by_instance(&s);
    pane.wait("the reloaded pids", |screen| {
        shows_all(screen, &reloaded) && screen.contains("reloaded 3 workers")
    });

    // The app stops under monit's feet: it leaves the list, monit carries on.
    cli(&home, &["stop", name]).assert_ok();
    pane.wait("no apps", |screen| screen.contains("no apps running"));

    // q quits with the terminal given back: main screen, cooked mode.
    pane.keys(&["q"]);
    let screen = pane.wait("monit's exit", |s| s.contains("TTY-"));
    assert!(screen.contains("monit exited 0"), "{screen}");
    assert!(screen.contains("TTY-COOKED"), "raw mode left on:\n{screen}");
    assert_eq!(pane.display("#{alternate_on}"), "0", "{screen}");
}

#[test]
fn monit_stays_responsive_while_a_supervisor_hangs_and_quits_on_ctrl_c() {
    let name = "monit-hung";
    let mut herd = start_node(name, 1, &[]);
    herd.wait_ready();
    let home = home_of(&herd);
    let pids = settled_pids(&home, name, 1);
    let Some(pane) = Pane::start(&home) else {
        return;
    };
    pane.wait("the worker pid", |s| shows_all(s, &pids));
    // A stopped supervisor accepts connections (the kernel queues them) and never answers.
    herd.signal(libc::SIGSTOP);
    let hung = pane.wait("the app shown as not answering", |s| {
        s.contains("(no answer)")
    });
    // An action to it waits on its own thread; the screen keeps answering keys.
    pane.keys(&["r"]);
    pane.wait("the action under way", |s| {
        s.contains(&format!("{name}: reload…"))
    });
    let asked = Instant::now();
    pane.keys(&["C-c"]);
    let screen = pane.wait("monit's exit", |s| s.contains("TTY-"));
    herd.signal(libc::SIGCONT);
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "Ctrl-C took {:?} with a hung supervisor",
        asked.elapsed()
    );
    assert!(screen.contains("monit exited 0"), "{hung}\n{screen}");
    assert!(screen.contains("TTY-COOKED"), "{screen}");
    herd.stop();
}

#[test]
fn monit_without_a_terminal_points_to_status_watch() {
    let dir = TempDir::new();
    let out = cli(dir.path(), &["monit"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("needs a terminal") && out.stderr.contains("status NAME --watch"),
        "{out}"
    );
}

#[test]
fn monit_given_sigterm_restores_the_terminal() {
    let home = TempDir::new();
    let Some(pane) = Pane::start(home.path()) else {
        return;
    };
    pane.wait("the empty dashboard", |s| s.contains("no apps running"));
    crate::util::kill(monit_pid(&pane), libc::SIGTERM);
    let screen = pane.wait("monit's exit", |s| s.contains("TTY-"));
    assert!(screen.contains("monit exited 0"), "{screen}");
    assert!(screen.contains("TTY-COOKED"), "raw mode left on:\n{screen}");
    assert_eq!(pane.display("#{alternate_on}"), "0", "{screen}");
}

#[test]
fn monit_exits_when_its_terminal_goes_away() {
    // Regression: crossterm reads a hung-up terminal's end-of-file in an endless loop; monit
    // spun at 100% CPU forever after its tmux session or terminal window was closed.
    let home = TempDir::new();
    let Some(pane) = Pane::start(home.path()) else {
        return;
    };
    pane.wait("the empty dashboard", |s| s.contains("no apps running"));
    let monit = monit_pid(&pane);
    pane.kill();
    assert!(
        crate::util::wait_dead(monit, WAIT),
        "monit {monit} still runs after its terminal hung up"
    );
}

/// The pane runs `sh`, whose only child is monit.
fn monit_pid(pane: &Pane) -> u32 {
    let sh = pane.display("#{pane_pid}");
    let children = std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children"))
        .expect("the pane's children");
    children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no monit under the pane's shell {sh}: {children:?}"))
}
