//! Health: hang detection, HTTP probes and the recycling limits, checked on a one-second
//! tick and on probe results. A worker over a limit or failing its probes is *replaced* the
//! reload way (its successor is ready before it is drained), one slot at a time, so capacity
//! never drops below N-1. A hung worker cannot drain: it is taken out of routing at once,
//! sent SIGABRT (a core or stack trace can be had) and then SIGKILL, and its slot restarts.
//!
//! Every replacement has a reason (`crash`, `hung`, `unhealthy`, `memory`, `requests`,
//! `age`, `reload`), counted per slot and shown by `herd status`.

use std::rc::Rc;
use std::time::Duration;

use herd_proto::control::Reason;
use herd_proto::event::EventName;
use serde_json::json;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

use crate::os::Os;

use super::ops::OpKind;
use super::state::{Replacement, Role, WorkerState};
use super::worker::Worker;
use super::{Event, Supervisor, WorkerId};
use crate::balance::Pending;
use crate::fmt::human;
use crate::health;
use crate::spec::WorkerKind;

/// How long a hung worker gets between SIGABRT and SIGKILL.
const ABORT_GRACE: Duration = Duration::from_secs(1);

impl Supervisor {
    /// How often the health tick runs: every second, or a quarter of `--watchdog` when that
    /// is shorter (at least 100ms), so a hang is found within about `watchdog` + a quarter.
    pub(super) fn tick_period(&self) -> Duration {
        let second = Duration::from_secs(1);
        match self.plan.spec.health.watchdog {
            Some(w) => (w / 4).clamp(Duration::from_millis(100), second),
            None => second,
        }
    }

    /// Starts the health tick if any check needs it.
    pub(super) fn start_health(&self) {
        let h = &self.plan.spec.health;
        let needed = h.watchdog.is_some()
            || h.check.is_some()
            || h.max_memory.is_some()
            || h.max_age.is_some()
            || self.samples_wanted();
        if !needed {
            return;
        }
        let tx = self.tx.clone();
        let period = self.tick_period();
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if tx.send(Event::Tick).is_err() {
                    return;
                }
            }
        });
    }

    /// The health tick: hang detection on every tick, probes on their schedule, memory and
    /// age once a second. What it finds is acted on after the scan.
    pub(super) fn on_tick(&mut self) {
        let now = Instant::now();
        let plan = Rc::clone(&self.plan);
        let health = &plan.spec.health;
        let period = self.tick_period();
        // /proc is read once a second, whatever the tick.
        let sample = self
            .last_sample
            .is_none_or(|t| now.duration_since(t) + period / 2 >= Duration::from_secs(1));
        if sample {
            self.last_sample = Some(now);
            self.record_samples();
        }
        let mut hung = Vec::new();
        let mut replace = Vec::new();
        let mut probes = Vec::new();
        for w in self.workers.values_mut() {
            if !w.state().health_checked() {
                continue;
            }
            if let Some(limit) = health.watchdog {
                if let Some(why) = watchdog(w, plan.kind, limit, now, &self.tx) {
                    hung.push((w.id, why));
                    continue;
                }
            }
            if w.replacement == Replacement::Queued {
                continue;
            }
            if let Some(check) = &health.check {
                if probe_due(w, check.interval, now, period) {
                    probes.push(w.id);
                }
            }
            if !sample {
                continue;
            }
            if let Some((reason, why)) = over_limit(&*self.os, w, health) {
                replace.push((w.id, reason, why));
            }
        }
        for (id, why) in hung {
            self.hung(id, why);
        }
        for (id, reason, why) in replace {
            self.queue_replacement(id, reason, why);
        }
        for id in probes {
            self.start_probe(id);
        }
    }

    /// A worker that stopped answering: out of routing now, then SIGABRT and SIGKILL.
    fn hung(&mut self, id: WorkerId, why: String) {
        let Some(mut w) = self.workers.remove(&id) else {
            return;
        };
        w.set_state(WorkerState::Hung {
            since: Instant::now(),
        });
        let who = w.who();
        self.logger.event(
            EventName::Hung,
            Some(who),
            &format!("hung: {why} (--watchdog) — killing it (SIGABRT, then SIGKILL) and starting a replacement"),
            &[("reason", json!(Reason::Hung)), ("detail", json!(why))],
        );
        self.os
            .signal_group(&w.leader, rustix::process::Signal::ABORT);
        self.detach(&mut w);
        self.workers.insert(id, w);
        self.after(
            ABORT_GRACE,
            Event::KillDue {
                id,
                signal: rustix::process::Signal::KILL,
                after: format!("SIGABRT and {} (hung)", human(ABORT_GRACE)),
            },
        );
    }

    /// Queues a graceful replacement; they run one at a time, between other operations.
    pub(super) fn queue_replacement(&mut self, id: WorkerId, reason: Reason, why: String) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.state().is_draining() || w.role == Role::Incoming {
            return;
        }
        match w.replacement {
            Replacement::Queued => return,
            Replacement::NotBefore(t) if Instant::now() < t => return,
            Replacement::NotBefore(_) | Replacement::Idle => {}
        }
        w.replacement = Replacement::Queued;
        let who = w.who();
        self.logger.event(
            EventName::Replacing,
            Some(who),
            &format!("will be replaced ({reason}): {why}"),
            &[("reason", json!(reason)), ("detail", json!(why))],
        );
        self.replacements.push_back((id, reason));
        self.next_replacement();
    }

    /// Starts the next queued replacement when nothing else is running.
    pub(super) fn next_replacement(&mut self) {
        if !matches!(self.phase, super::phase::AppPhase::Running) {
            return;
        }
        while let Some((id, reason)) = self.replacements.pop_front() {
            let Some(w) = self.workers.get(&id) else {
                continue;
            };
            if w.state().is_draining() {
                continue;
            }
            let instance = w.instance;
            if self
                .slots
                .get(instance)
                .is_none_or(|s| s.worker != Some(id) || s.retiring)
            {
                continue;
            }
            self.begin(OpKind::Replace { instance, reason }, None);
            return;
        }
    }

    fn start_probe(&mut self, id: WorkerId) {
        let Some(check) = self.plan.spec.health.check.clone() else {
            return;
        };
        let tx = self.tx.clone();
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        w.probing = true;
        let deadline = tokio::time::Instant::now() + check.timeout;
        if let Some(port) = w.health_port {
            tokio::task::spawn_local(async move {
                let result = match tokio::time::timeout_at(
                    deadline,
                    tokio::net::TcpStream::connect(("127.0.0.1", port)),
                )
                .await
                {
                    Ok(Ok(stream)) => health::probe(stream, &check.path, deadline).await,
                    Ok(Err(e)) => Err(format!("cannot connect to its health socket: {e}")),
                    Err(_) => Err(format!(
                        "its health socket did not accept within {}",
                        human(check.timeout)
                    )),
                };
                let _ = tx.send(Event::Probe { id, result });
            });
            return;
        }
        // Node: the worker gets the server end of a loopback connection nobody else can
        // make (health::private_pair), handed over on a TCP server it holds.
        if !w
            .servers
            .iter()
            .any(|&s| self.servers.get(s).is_some_and(|s| s.sockname.is_some()))
        {
            let _ = tx.send(Event::Probe {
                id,
                result: Err("it holds no TCP server herd can reach".into()),
            });
            return;
        }
        tokio::task::spawn_local(async move {
            match tokio::time::timeout_at(deadline, health::private_pair(deadline)).await {
                Ok(Ok(conn)) => {
                    let _ = tx.send(Event::ProbeConn { id, conn });
                }
                Ok(Err(e)) => {
                    let _ = tx.send(Event::Probe {
                        id,
                        result: Err(format!("cannot make the probe connection: {e}")),
                    });
                }
                Err(_) => {
                    let _ = tx.send(Event::Probe {
                        id,
                        result: Err("the probe connection was not made in time".into()),
                    });
                }
            }
        });
    }

    /// The private probe connection is ready: the worker gets its server end as a
    /// `newconn` (so the app's server sees an ordinary connection), herd speaks HTTP on the
    /// other.
    pub(super) fn on_probe_conn(&mut self, id: WorkerId, conn: health::ProbeConn) {
        let Some(check) = self.plan.spec.health.check.clone() else {
            return;
        };
        let tx = self.tx.clone();
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let server = w
            .servers
            .iter()
            .copied()
            .find(|&s| self.servers.get(s).is_some_and(|s| s.sockname.is_some()));
        let key_json = server.and_then(|s| self.servers.get(s).map(|s| Rc::clone(&s.key_json)));
        let (Some(server), Some(key_json)) = (server, key_json) else {
            let _ = tx.send(Event::Probe {
                id,
                result: Err("it holds no TCP server herd can reach".into()),
            });
            return;
        };
        let health::ProbeConn {
            client,
            served,
            deadline,
        } = conn;
        let pending = Pending {
            fd: served,
            peer: None,
            attempts: 0,
            probe: true,
        };
        if w.hand_off(&self.tx, server, &key_json, pending).is_err() {
            let _ = tx.send(Event::Probe {
                id,
                result: Err("its IPC channel is closed".into()),
            });
            return;
        }
        tokio::task::spawn_local(async move {
            let result = health::probe(client, &check.path, deadline).await;
            let _ = tx.send(Event::Probe { id, result });
        });
    }

    pub(super) fn on_probe(&mut self, id: WorkerId, result: Result<u16, String>) {
        let Some(check) = self.plan.spec.health.check.clone() else {
            return;
        };
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        w.probing = false;
        let who = w.who();
        match result {
            Ok(code) if (200..400).contains(&code) => {
                if w.probe_failures > 0 {
                    self.logger.event(
                        EventName::Healthy,
                        Some(who),
                        &format!("healthy again ({code})"),
                        &[],
                    );
                }
                w.probe_failures = 0;
                w.health = Some(format!("ok ({code})"));
            }
            failure => {
                let why = match failure {
                    Ok(code) => format!("status {code}"),
                    Err(e) => e,
                };
                w.probe_failures += 1;
                let n = w.probe_failures;
                self.observe.probe_failed(who.instance);
                w.health = Some(format!("failing {n}/{}: {why}", check.failures));
                self.logger.event(
                    EventName::ProbeFailed,
                    Some(who),
                    &format!("GET {} failed ({n}/{}): {why}", check.path, check.failures),
                    &[("failures", json!(n))],
                );
                if n >= check.failures {
                    self.queue_replacement(
                        id,
                        Reason::Unhealthy,
                        format!("{n} failed probes in a row, last: {why}"),
                    );
                }
            }
        }
    }
}

/// Why the worker counts as hung, if it does: no `WATCHDOG=1` (socket activation), or
/// (Node) a hand-off or event-loop ping unanswered for longer than `limit`. Sends the next
/// ping when the last one was answered.
fn watchdog(
    w: &mut Worker,
    kind: WorkerKind,
    limit: Duration,
    now: Instant,
    tx: &UnboundedSender<Event>,
) -> Option<String> {
    if kind == WorkerKind::SocketActivation && now.duration_since(w.last_watchdog) > limit {
        return Some(format!(
            "no WATCHDOG=1 for {}",
            human(now.duration_since(w.last_watchdog))
        ));
    }
    let (waiting, pongs) = match &w.channel {
        Some(c) => (c.waiting_since(), c.pongs()),
        None => return None,
    };
    let unanswered = w.inflight.iter().map(|f| f.at).min();
    let oldest = waiting.into_iter().chain(unanswered).min();
    if let Some(since) = oldest.filter(|s| now.duration_since(*s) > limit) {
        return Some(format!(
            "it did not answer herd (event-loop ping or connection hand-off) for {}",
            human(now.duration_since(since))
        ));
    }
    if let Some((sent, before)) = w.ping {
        if pongs > before {
            w.ping = None;
        } else if now.duration_since(sent) > limit {
            let silent = human(now.duration_since(sent));
            return Some(format!(
                "its event loop did not answer herd's ping for {silent}"
            ));
        }
    }
    if w.ping.is_none() && w.send(tx, |c| c.ping()) {
        // One ping per tick at most: the answer of the last one came back.
        w.ping = Some((now, pongs));
    }
    None
}

/// Whether its next probe is due; if so, schedules the one after.
fn probe_due(w: &mut Worker, interval: Duration, now: Instant, period: Duration) -> bool {
    // Keep the cadence of the schedule, not of the ticks that notice it.
    if w.probing || w.probe_due.is_some_and(|due| now + period / 2 < due) {
        return false;
    }
    let due = w
        .probe_due
        .unwrap_or(now)
        .max(now.checked_sub(period).unwrap_or(now));
    w.probe_due = Some(due + interval);
    true
}

/// `--max-memory` or `--max-age` exceeded (reads /proc).
fn over_limit(os: &dyn Os, w: &Worker, health: &crate::spec::Health) -> Option<(Reason, String)> {
    if let Some(max) = health.max_memory {
        if let Some(rss) = os.rss_bytes(w.pid).filter(|&rss| rss > max) {
            return Some((
                Reason::Memory,
                format!("memory {} MB > --max-memory {} MB", rss >> 20, max >> 20),
            ));
        }
    }
    let max_age = health.max_age?;
    let limit = max_age
        + Duration::from_millis(health::jitter(
            w.id,
            health.max_age_jitter.as_millis() as u64,
        ));
    (w.started.elapsed() > limit).then(|| {
        (
            Reason::Age,
            format!(
                "up {} > --max-age {}",
                human(w.started.elapsed()),
                human(limit)
            ),
        )
    })
}
