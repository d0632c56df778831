//! The test rig: a supervisor of fake socket-activation workers, and helpers to read its answers.

use std::future::Future;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use herd_proto::control::{AppStatus, Request, Response, WorkerStatus};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::logs::Logger;
use crate::os::fake::FakeOs;
use crate::plan::Plan;
use crate::spec::{Balance, Health, Instances, LogFormat, Policy, Ready, Spec, WorkerKind};
use crate::supervisor::{Event, Supervisor, WorkerId};

pub const MS: Duration = Duration::from_millis(1);

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Runs a test body on a `LocalSet` (the supervisor spawns local tasks).
pub async fn local(body: impl Future<Output = ()>) {
    tokio::task::LocalSet::new().run_until(body).await;
}

pub fn spec(instances: usize) -> Spec {
    Spec {
        name: "app".into(),
        program: "fake-worker".into(),
        args: Vec::new(),
        interpreter: None,
        instances: Instances::Count(instances),
        listen: Vec::new(),
        env: Vec::new(),
        cwd: None,
        user: None,
        group: None,
        balance: Some(Balance::Shared),
        ready: Some(Ready::Notify),
        policy: Policy {
            kill_timeout: ms(5000),
            restart_delay: ms(100),
            min_uptime: ms(1000),
            max_restarts: 15,
            autorestart: true,
            listen_timeout: ms(10_000),
            sticky_wait: ms(2000),
        },
        health: Health::default(),
        keepalive_drain: false,
        log_format: LogFormat::Text,
    }
}

/// A private run directory for the workers' notify sockets (the only files a test makes).
pub fn run_dir() -> PathBuf {
    use std::os::unix::fs::DirBuilderExt;
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "herd-unit-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .expect("run dir");
    dir
}

/// A supervisor, its event channel and its fake OS.
pub struct Rig {
    pub sup: Supervisor,
    rx: UnboundedReceiver<Event>,
    pub os: Rc<FakeOs>,
    run_dir: PathBuf,
    instances: usize,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

impl Rig {
    pub fn start(spec: Spec) -> Rig {
        Rig::start_with(spec, FakeOs::new())
    }

    pub fn start_with(spec: Spec, os: Rc<FakeOs>) -> Rig {
        let instances = spec.instances.resolve();
        let plan = Plan {
            spec,
            kind: WorkerKind::SocketActivation,
            program: "/nonexistent/fake-worker".into(),
            argv: vec!["fake-worker".into()],
            instances,
            balance: Balance::Shared,
            ready: Ready::Notify,
            listeners: Default::default(),
            cwd: None,
            user: None,
        };
        let run_dir = run_dir();
        let (mut sup, rx) =
            Supervisor::with_os(plan, Logger::quiet("app"), run_dir.clone(), os.clone());
        os.attach(sup.sender());
        sup.start();
        Rig {
            sup,
            rx,
            os,
            run_dir,
            instances,
        }
    }

    /// [`Rig::start`], then every slot's first worker ready: where most tests begin.
    pub async fn ready(spec: Spec) -> Rig {
        let mut rig = Rig::start(spec);
        rig.settle().await;
        rig.all_ready().await;
        rig
    }

    /// Handles every event due now: lets the supervisor's tasks run, without moving time.
    pub async fn settle(&mut self) {
        loop {
            for _ in 0..8 {
                tokio::task::yield_now().await;
            }
            let mut any = false;
            while let Ok(event) = self.rx.try_recv() {
                self.sup.handle(event);
                any = true;
            }
            if !any {
                return;
            }
        }
    }

    /// Lets `d` of virtual time pass, handling each event when it comes.
    pub async fn advance(&mut self, d: Duration) {
        let until = Instant::now() + d;
        loop {
            self.settle().await;
            match tokio::time::timeout_at(until, self.rx.recv()).await {
                Ok(Some(event)) => self.sup.handle(event),
                Ok(None) | Err(_) => break,
            }
        }
        self.settle().await;
    }

    /// Sends a control request; the answer comes on the receiver.
    pub async fn control(&mut self, request: Request) -> oneshot::Receiver<Response> {
        let (reply, answer) = oneshot::channel();
        self.sup.handle(Event::Control { request, reply });
        self.settle().await;
        answer
    }

    pub async fn status(&mut self) -> AppStatus {
        let mut answer = self.control(Request::Status).await;
        answer
            .try_recv()
            .expect("status is answered at once")
            .status
            .expect("a status")
    }

    /// Every slot's first worker says READY=1.
    pub async fn all_ready(&mut self) {
        for instance in 0..self.instances {
            self.os.ready(self.os.newest(instance));
        }
        self.settle().await;
    }
}

/// A state as it travels on the wire (the way `herd status --json` shows it).
pub fn state(w: &WorkerStatus) -> String {
    w.state.as_str().to_string()
}

pub fn app_state(s: &AppStatus) -> String {
    s.state.as_str().to_string()
}

/// (instance, worker id, state) of every row of `herd status`.
pub fn rows(s: &AppStatus) -> Vec<(usize, WorkerId, String)> {
    s.workers
        .iter()
        .map(|w| (w.instance, w.worker_id, state(w)))
        .collect()
}

pub fn answered(answer: &mut oneshot::Receiver<Response>) -> Option<Response> {
    answer.try_recv().ok()
}

/// `actual` is `expected` late by at most the timer wheel's millisecond.
pub fn assert_about(actual: Duration, expected: Duration, what: &str) {
    assert!(
        actual >= expected && actual <= expected + 2 * MS,
        "{what}: {actual:?}, expected {expected:?}"
    );
}
