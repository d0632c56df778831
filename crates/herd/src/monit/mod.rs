//! `herd monit`: a terminal dashboard over every app in `HERD_HOME`.
//!
//! Three parts, so that the screen never waits on a supervisor:
//! - [`poll`]: a thread asks every app for its status once a second (and the selected app
//!   for its log tail), each request with a timeout; actions run on threads of their own.
//! - [`model`]: what is shown and the keys, as plain data: the poll results, the selection,
//!   a ring of the last minute of CPU and memory samples per worker slot.
//! - [`view`]: draws the model with ratatui.
//!
//! The loop here draws, waits at most [`TICK`] for a key, and takes in whatever the threads
//! sent. The terminal (raw mode, alternate screen, hidden cursor) is given back on every way
//! out: a normal return, an error (the [`Terminal`] guard's drop), a panic (a panic hook; the
//! release profile aborts on panic, so a drop would not run) and SIGTERM, SIGHUP or SIGINT
//! (a flag the loop checks), and the terminal hanging up. In raw mode Ctrl-C arrives as a
//! key and quits too.

mod model;
mod poll;
mod view;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event, KeyEventKind};
use ratatui::crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use ratatui::crossterm::{cursor, execute};

use crate::paths::Home;
use model::{Action, Model};

/// The longest the loop waits for a key before it looks at the threads and the signals.
const TICK: Duration = Duration::from_millis(200);
/// The longest the screen goes without being drawn again.
const REDRAW: Duration = Duration::from_secs(1);

pub fn run(home: Home) -> anyhow::Result<u8> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "herd monit needs a terminal (its stdin and stdout must be a TTY); for plain output \
             that refreshes, use `herd status NAME --watch` or `herd ls --watch`"
        );
    }
    let quit = Arc::new(AtomicBool::new(false));
    for signal in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
        signal_hook::flag::register(signal, quit.clone())
            .context("cannot set up signal handling")?;
    }
    let home = Arc::new(home);
    let selected: poll::Selected = Arc::new(Mutex::new(None));
    let snapshots = poll::spawn_poller(home.clone(), selected.clone())
        .context("cannot start the thread that polls the apps")?;
    let actions = poll::Actions::new(home);
    let mut terminal = Terminal::enter().context("cannot set up the terminal")?;
    let mut model = Model::default();
    // Drawn when something changed, and at least every REDRAW (the "no answer for Ns" age).
    let mut dirty = true;
    let mut drawn = Instant::now();
    while !quit.load(Ordering::Relaxed) {
        // The newest poll only: the channel holds at most one.
        while let Ok(snapshot) = snapshots.try_recv() {
            model.update(snapshot, Instant::now());
            dirty = true;
        }
        while let Ok(done) = actions.done.try_recv() {
            model.status_line = done.text;
            dirty = true;
        }
        if let Ok(mut s) = selected.lock() {
            s.clone_from(&model.selected);
        }
        let now = Instant::now();
        if dirty || now.duration_since(drawn) >= REDRAW {
            terminal
                .inner
                .draw(|frame| view::render(frame, &model, now))
                .context("cannot draw on the terminal")?;
            (dirty, drawn) = (false, now);
        }
        if wait_input(TICK) == Input::HungUp {
            break;
        }
        // Whatever crossterm has now (keys, a resize that interrupted the wait); never a
        // blocking read.
        while event::poll(Duration::ZERO).context("cannot read the terminal")? {
            // A resize, a key: draw again.
            dirty = true;
            let Event::Key(key) = event::read().context("cannot read the terminal")? else {
                continue;
            };
            if key.kind != KeyEventKind::Press {
                continue;
            }
            match model.key(key) {
                Some(Action::Quit) => {
                    quit.store(true, Ordering::Relaxed);
                    break;
                }
                Some(Action::Control { app, what, request }) => {
                    model.status_line = actions.start(app, what, request);
                }
                None => {}
            }
        }
    }
    drop(terminal);
    Ok(0)
}

#[derive(Debug, PartialEq, Eq)]
enum Input {
    /// Something to read, a timeout, or a signal: look.
    Look,
    /// The terminal is gone (its window closed, the tmux session killed).
    HungUp,
}

/// Waits up to `timeout` for the terminal (stdin, checked to be one) to have input.
///
/// Ours rather than crossterm's wait because crossterm 0.29 reads a hung-up terminal's
/// end-of-file in a loop that never returns: monit would spin at 100% CPU and never see the
/// SIGHUP flag. A signal (SIGWINCH, SIGTERM) ends the wait early too.
fn wait_input(timeout: Duration) -> Input {
    let mut fds = [libc::pollfd {
        fd: libc::STDIN_FILENO,
        events: libc::POLLIN,
        revents: 0,
    }];
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
    let gone = libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
    if n > 0 && fds[0].revents & gone != 0 {
        Input::HungUp
    } else {
        Input::Look
    }
}

/// The terminal in raw mode on the alternate screen, given back when dropped (and by the
/// panic hook installed with it).
struct Terminal {
    inner: ratatui::Terminal<CrosstermBackend<std::io::Stdout>>,
}

impl Terminal {
    fn enter() -> std::io::Result<Self> {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        let entered = enable_raw_mode()
            .and_then(|()| execute!(std::io::stdout(), EnterAlternateScreen, cursor::Hide))
            .and_then(|()| ratatui::Terminal::new(CrosstermBackend::new(std::io::stdout())));
        match entered {
            Ok(inner) => Ok(Terminal { inner }),
            Err(e) => {
                restore();
                Err(e)
            }
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        restore();
    }
}

/// Every step is tried even when one fails: a terminal left in raw mode is unusable.
fn restore() {
    let _ = disable_raw_mode();
    let _ = execute!(std::io::stdout(), LeaveAlternateScreen, cursor::Show);
}
