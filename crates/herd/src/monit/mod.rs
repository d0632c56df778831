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
//! (a flag the loop checks). In raw mode Ctrl-C arrives as a key and quits too.

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
    while !quit.load(Ordering::Relaxed) {
        // The newest poll only: the channel holds at most one.
        while let Ok(snapshot) = snapshots.try_recv() {
            model.update(snapshot, Instant::now());
        }
        while let Ok(done) = actions.done.try_recv() {
            model.status_line = done.text;
        }
        if let Ok(mut s) = selected.lock() {
            s.clone_from(&model.selected);
        }
        let now = Instant::now();
        terminal
            .inner
            .draw(|frame| view::render(frame, &model, now))
            .context("cannot draw on the terminal")?;
        if !event::poll(TICK).context("cannot read the terminal")? {
            continue;
        }
        let Event::Key(key) = event::read().context("cannot read the terminal")? else {
            continue;
        };
        if key.kind != KeyEventKind::Press {
            continue;
        }
        match model.key(key) {
            Some(Action::Quit) => break,
            Some(Action::Control { app, what, request }) => {
                model.status_line = actions.start(app, what, request);
            }
            None => {}
        }
    }
    drop(terminal);
    Ok(0)
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
