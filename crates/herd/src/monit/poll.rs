//! The threads that talk to supervisors, so that the screen never waits on one.
//!
//! The poller asks every app in `HERD_HOME` for its status once a second (and the selected
//! app for its log tail), each request with a short timeout, and hands the results to the
//! UI as a [`Snapshot`]. An app that stops simply disappears from the next poll; one that
//! hangs costs the poller its timeout, and the screen says how old its data is. Actions
//! (reload, restart a worker, scale) run on their own threads, at most [`MAX_ACTIONS`] at a
//! time, and report their control answer back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herd_proto::control::{Request, Response};

use super::model::{App, Snapshot, LOG_LINES};
use crate::control::{Client, ClientError};
use crate::logs::line::sanitize;
use crate::paths::{AppName, Home};

/// How often every app is asked.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// The longest a status or log request may take before the app is shown as not answering.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// An action's answer comes when it is done (a reload waits for every worker); past this
/// the status line says it is still unknown.
const ACTION_TIMEOUT: Duration = Duration::from_secs(300);
/// Actions in flight at once; another key press while they run is refused on screen.
pub const MAX_ACTIONS: usize = 4;

/// The app whose log tail the poller fetches; the UI changes it.
pub type Selected = Arc<Mutex<Option<AppName>>>;

fn ask(
    home: &Home,
    name: &AppName,
    req: &Request,
    timeout: Duration,
) -> Result<Response, ClientError> {
    Client::connect(home, name)?.request(req, Some(timeout))
}

fn describe(e: ClientError) -> String {
    sanitize(&format!("{:#}", anyhow::Error::from(e))).into_owned()
}

/// One round: every app's status and the selected app's log tail.
pub fn poll_once(home: &Home, selected: Option<AppName>) -> Snapshot {
    let mut apps = Vec::new();
    for name in home.apps() {
        let status = match ask(home, &name, &Request::Status, REQUEST_TIMEOUT) {
            Ok(Response {
                status: Some(status),
                ..
            }) => Ok(status),
            Ok(r) => Err(sanitize(&r.message).into_owned()),
            // Gone between the listing and the request: not an app any more.
            Err(ClientError::NotRunning(_)) => continue,
            Err(e) => Err(describe(e)),
        };
        apps.push(App { name, status });
    }
    let logs = selected
        .filter(|s| apps.iter().any(|a| &a.name == s && a.status.is_ok()))
        .map(|name| {
            let req = Request::Logs {
                lines: LOG_LINES,
                follow: false,
                instance: None,
            };
            let lines = match ask(home, &name, &req, REQUEST_TIMEOUT) {
                // A worker's output is shown escaped: it never reaches the terminal as control
                // characters.
                Ok(r) if r.ok => Ok(r
                    .lines
                    .iter()
                    .map(|l| sanitize(&l.text).into_owned())
                    .collect()),
                Ok(r) => Err(sanitize(&r.message).into_owned()),
                Err(e) => Err(describe(e)),
            };
            (name, lines)
        });
    Snapshot { apps, logs }
}

/// Polls until the UI is gone (its receiver dropped). The channel holds one snapshot: a UI
/// that is behind gets the next one when it catches up, never a queue.
pub fn spawn_poller(home: Arc<Home>, selected: Selected) -> std::io::Result<Receiver<Snapshot>> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("monit-poll".into())
        .spawn(move || poller(&home, &selected, &tx))?;
    Ok(rx)
}

fn poller(home: &Home, selected: &Selected, tx: &SyncSender<Snapshot>) {
    loop {
        let started = Instant::now();
        let name = selected.lock().map(|s| s.clone()).unwrap_or(None);
        if tx.send(poll_once(home, name)).is_err() {
            return;
        }
        std::thread::sleep(INTERVAL.saturating_sub(started.elapsed()));
    }
}

/// An action's outcome for the status line.
pub struct Done {
    pub text: String,
}

/// Runs actions on their own threads and counts them.
pub struct Actions {
    home: Arc<Home>,
    running: Arc<AtomicUsize>,
    tx: Sender<Done>,
    pub done: Receiver<Done>,
}

impl Actions {
    pub fn new(home: Arc<Home>) -> Self {
        let (tx, done) = std::sync::mpsc::channel();
        Actions {
            home,
            running: Arc::new(AtomicUsize::new(0)),
            tx,
            done,
        }
    }

    /// Starts `request` for `app`; the line to show now.
    pub fn start(&self, app: AppName, what: String, request: Request) -> String {
        if self.running.load(Ordering::SeqCst) >= MAX_ACTIONS {
            return format!("{MAX_ACTIONS} actions are still waiting for their answers; try again once one is done");
        }
        self.running.fetch_add(1, Ordering::SeqCst);
        let (home, running, tx) = (self.home.clone(), self.running.clone(), self.tx.clone());
        let shown = format!("{app}: {what}…");
        let failed = format!("cannot start {what}");
        let spawned = std::thread::Builder::new()
            .name("monit-action".into())
            .spawn(move || {
                let text = match ask(&home, &app, &request, ACTION_TIMEOUT) {
                    Ok(r) if r.ok => format!("{app}: {}", sanitize(&r.message)),
                    Ok(r) => format!("{app}: {what} failed: {}", sanitize(&r.message)),
                    Err(e) => format!("{app}: {what}: {}", describe(e)),
                };
                running.fetch_sub(1, Ordering::SeqCst);
                let _ = tx.send(Done { text });
            });
        match spawned {
            Ok(_) => shown,
            Err(e) => {
                self.running.fetch_sub(1, Ordering::SeqCst);
                format!("{failed}: {e}")
            }
        }
    }
}
