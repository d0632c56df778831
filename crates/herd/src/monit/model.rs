//! What `herd monit` shows, without any terminal: the apps from the last poll, which app and
//! worker are selected, each worker slot's last [`HISTORY`] CPU and memory samples, the
//! selected app's log tail and the outcome of the last action. Keys become [`Action`]s here;
//! the terminal and the threads that talk to supervisors are elsewhere, so all of this is
//! tested as plain data.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use herd_proto::control::AppStatus;
use herd_proto::control::Request::{self, Reload, RestartWorker, Scale};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::paths::AppName;

/// Samples kept per worker slot: one a second, so a minute.
pub const HISTORY: usize = 60;
/// Log lines kept for the selected app.
pub const LOG_LINES: usize = 200;

/// One app as the last poll saw it.
#[derive(Debug, Clone)]
pub struct App {
    pub name: AppName,
    /// Its status, or why it did not answer (shown instead).
    pub status: Result<AppStatus, String>,
}

/// Everything one poll found; the poller sends one a second.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub apps: Vec<App>,
    /// The log tail of the app that was selected when the poll began.
    pub logs: Option<(AppName, Result<Vec<String>, String>)>,
}

/// What a key asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Quit,
    /// A control request for an app, with a name for the status line.
    Control {
        app: AppName,
        what: String,
        request: Request,
    },
}

/// A worker slot's recent samples (percent of a core; bytes).
#[derive(Debug, Default, Clone)]
pub struct Samples {
    pub cpu: VecDeque<f64>,
    pub memory: VecDeque<u64>,
}

impl Samples {
    fn push(&mut self, cpu: f64, memory: u64) {
        if self.cpu.len() == HISTORY {
            self.cpu.pop_front();
            self.memory.pop_front();
        }
        self.cpu.push_back(cpu);
        self.memory.push_back(memory);
    }
}

#[derive(Debug, Default)]
pub struct Model {
    pub apps: Vec<App>,
    /// The selected app, by name, so that apps coming and going keep the selection.
    pub selected: Option<AppName>,
    /// The selected worker slot of the selected app.
    pub instance: usize,
    /// By app name and instance.
    pub history: BTreeMap<(String, usize), Samples>,
    pub logs: Option<(AppName, Result<Vec<String>, String>)>,
    /// The last action's outcome (or that it is running).
    pub status_line: String,
    /// When the last poll arrived.
    pub polled: Option<Instant>,
}

impl Model {
    /// Takes a poll's results in: the app list, one sample per worker slot, the log tail.
    pub fn update(&mut self, snapshot: Snapshot, now: Instant) {
        self.apps = snapshot.apps;
        let mut seen = Vec::new();
        for app in &self.apps {
            let Ok(status) = &app.status else { continue };
            for w in &status.workers {
                let key = (app.name.to_string(), w.instance);
                self.history
                    .entry(key.clone())
                    .or_default()
                    .push(w.cpu_percent, w.memory_bytes);
                seen.push(key);
            }
        }
        // Slots that are gone (scaled down, app stopped) lose their history.
        self.history.retain(|key, _| seen.contains(key));
        if snapshot.logs.is_some() {
            self.logs = snapshot.logs;
        }
        self.polled = Some(now);
        self.fix_selection();
    }

    /// The selection stays on an app that still exists (else the first), and on a worker
    /// slot it has.
    fn fix_selection(&mut self) {
        let exists = |name: &AppName| self.apps.iter().any(|a| &a.name == name);
        if !self.selected.as_ref().is_some_and(exists) {
            self.selected = self.apps.first().map(|a| a.name.clone());
            self.instance = 0;
        }
        let workers = self.workers_of_selected();
        if workers > 0 && self.instance >= workers {
            self.instance = workers - 1;
        }
    }

    pub fn selected_index(&self) -> Option<usize> {
        let name = self.selected.as_ref()?;
        self.apps.iter().position(|a| &a.name == name)
    }

    pub fn selected_app(&self) -> Option<&App> {
        self.selected_index().map(|i| &self.apps[i])
    }

    fn workers_of_selected(&self) -> usize {
        match self.selected_app().map(|a| &a.status) {
            Some(Ok(s)) => s.workers.len(),
            _ => 0,
        }
    }

    /// How long ago the last poll came, when that is long enough to say so.
    pub fn stale(&self, now: Instant) -> Option<Duration> {
        let age = now.saturating_duration_since(self.polled?);
        (age >= Duration::from_secs(3)).then_some(age)
    }

    fn move_app(&mut self, down: bool) {
        if self.apps.is_empty() {
            return;
        }
        let n = self.apps.len();
        let i = self.selected_index().unwrap_or(0);
        let next = if down { (i + 1) % n } else { (i + n - 1) % n };
        if next != i {
            self.instance = 0;
        }
        self.selected = Some(self.apps[next].name.clone());
    }

    fn move_worker(&mut self, forward: bool) {
        let n = self.workers_of_selected();
        if n == 0 {
            return;
        }
        self.instance = if forward {
            (self.instance + 1) % n
        } else {
            (self.instance + n - 1) % n
        };
    }

    /// A key press: moves the selection, or asks for an action.
    pub fn key(&mut self, key: KeyEvent) -> Option<Action> {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        match key.code {
            KeyCode::Char('c') if ctrl => return Some(Action::Quit),
            KeyCode::Char('q') | KeyCode::Esc => return Some(Action::Quit),
            KeyCode::Up | KeyCode::Char('k') => self.move_app(false),
            KeyCode::Down | KeyCode::Char('j') => self.move_app(true),
            KeyCode::Tab | KeyCode::Right => self.move_worker(true),
            KeyCode::BackTab | KeyCode::Left => self.move_worker(false),
            KeyCode::Char('r') => return self.control("reload", Reload { parallel: 1 }),
            KeyCode::Char('R') => {
                let instance = self.selected_instance()?;
                let what = format!("restart of worker {instance}");
                return self.control(&what, RestartWorker { instance });
            }
            KeyCode::Char('+') | KeyCode::Char('=') => {
                return self.control("scale +1", Scale { to: "+1".into() })
            }
            KeyCode::Char('-') => return self.control("scale -1", Scale { to: "-1".into() }),
            _ => {}
        }
        None
    }

    /// The selected worker's instance, as the app's status lists it.
    pub fn selected_instance(&self) -> Option<usize> {
        match &self.selected_app()?.status {
            Ok(s) => s.workers.get(self.instance).map(|w| w.instance),
            Err(_) => None,
        }
    }

    fn control(&self, what: &str, request: Request) -> Option<Action> {
        Some(Action::Control {
            app: self.selected.clone()?,
            what: what.to_string(),
            request,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_proto::control::{AppState, WorkerState, WorkerStatus};

    fn name(s: &str) -> AppName {
        AppName::new(s).expect("name")
    }

    fn app(n: &str, workers: usize, cpu: f64) -> App {
        App {
            name: name(n),
            status: Ok(AppStatus {
                name: n.into(),
                state: AppState::Running,
                balance: "shared".into(),
                kind: "node".into(),
                pid: 10,
                uptime_ms: 1000,
                desired: workers,
                ready: workers,
                restarts: 0,
                cpu_percent: cpu,
                memory_bytes: 1,
                supervisor_memory_bytes: 1,
                listen: vec![],
                config: None,
                args: vec![],
                workers: (0..workers)
                    .map(|i| WorkerStatus {
                        instance: i,
                        worker_id: i as u64 + 1,
                        pid: 100 + i as u32,
                        state: WorkerState::Ready,
                        uptime_ms: 1000,
                        restarts: 0,
                        last_exit: None,
                        cpu_percent: cpu,
                        memory_bytes: 1 << 20,
                        connections: 0,
                        status_text: None,
                        health: None,
                        restarts_by_reason: Default::default(),
                    })
                    .collect(),
            }),
        }
    }

    fn snap(apps: Vec<App>) -> Snapshot {
        Snapshot { apps, logs: None }
    }

    fn press(m: &mut Model, code: KeyCode) -> Option<Action> {
        m.key(KeyEvent::new(code, KeyModifiers::NONE))
    }

    #[test]
    fn history_is_a_bounded_ring_per_slot_and_forgets_gone_slots() {
        let mut m = Model::default();
        let now = Instant::now();
        for i in 0..HISTORY + 5 {
            m.update(snap(vec![app("web", 2, i as f64)]), now);
        }
        let web0 = &m.history[&("web".to_string(), 0)];
        assert_eq!(web0.cpu.len(), HISTORY);
        assert_eq!(web0.cpu.back(), Some(&((HISTORY + 4) as f64)));
        m.update(snap(vec![app("web", 1, 0.0)]), now);
        assert!(!m.history.contains_key(&("web".to_string(), 1)));
        m.update(snap(vec![]), now);
        assert!(m.history.is_empty());
        assert_eq!(m.selected, None);
    }

    #[test]
    fn keys_move_the_selection_and_name_the_selected_target() {
        let mut m = Model::default();
        m.update(
            snap(vec![app("api", 1, 0.0), app("web", 3, 0.0)]),
            Instant::now(),
        );
        assert_eq!(m.selected, Some(name("api")));
        assert_eq!(press(&mut m, KeyCode::Char('j')), None);
        assert_eq!(m.selected, Some(name("web")));
        press(&mut m, KeyCode::Tab);
        press(&mut m, KeyCode::Right);
        assert_eq!(m.instance, 2);
        press(&mut m, KeyCode::Tab);
        assert_eq!(m.instance, 0, "wraps around");
        press(&mut m, KeyCode::Left);
        let Some(Action::Control {
            app: target,
            request,
            ..
        }) = press(&mut m, KeyCode::Char('R'))
        else {
            panic!("R restarts a worker")
        };
        assert_eq!(
            (target, request),
            (name("web"), Request::RestartWorker { instance: 2 })
        );
        assert!(matches!(
            press(&mut m, KeyCode::Char('+')),
            Some(Action::Control {
                request: Request::Scale { .. },
                ..
            })
        ));
        assert_eq!(press(&mut m, KeyCode::Char('q')), Some(Action::Quit));
        assert_eq!(press(&mut m, KeyCode::Esc), Some(Action::Quit));
        assert_eq!(
            m.key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Some(Action::Quit)
        );
        // The app goes away: the selection moves to one that exists.
        m.update(snap(vec![app("api", 1, 0.0)]), Instant::now());
        assert_eq!((m.selected.clone(), m.instance), (Some(name("api")), 0));
    }

    #[test]
    fn nothing_to_act_on_asks_for_nothing() {
        let mut m = Model::default();
        assert_eq!(press(&mut m, KeyCode::Char('r')), None);
        assert_eq!(press(&mut m, KeyCode::Char('R')), None);
        assert_eq!(press(&mut m, KeyCode::Down), None);
    }
}
