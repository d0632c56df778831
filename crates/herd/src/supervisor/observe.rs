//! What `--http` reads from the supervisor, and the drain before a stop.
//!
//! The HTTP server runs in tasks of its own and asks through the event channel
//! ([`Query`]); every answer is built here, on the supervisor's loop, from its own state:
//! no locks, and `/live` answering means the loop runs. Answers are plain data; turning
//! them into text (Prometheus, JSON) happens in the HTTP task.
//!
//! With `--http`, the one-second tick also records each slot's CPU and memory in a ring of
//! [`SAMPLES`] readings (10 minutes), for the dashboard's charts: a fixed size per slot,
//! 12 bytes a reading.
//!
//! **Drain** (`--drain-delay D`): `herd stop`, SIGTERM or SIGINT first mark the app
//! stopping (`/ready` answers 503, `herd status` says `stopping`) while every worker keeps
//! serving, and only after `D` begin the graceful stop, so a load balancer has taken the
//! host out of rotation before anything closes. A second SIGINT ends the wait at once.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::procfs::CpuSample;
use herd_proto::event::EventName;
use serde_json::json;

use super::{Event, Supervisor, WorkerId};
use crate::fmt::human;
use crate::http::{Query, Readiness, SlotMetrics, Snapshot, WorkerMetrics};
use crate::spec::{Balance, WorkerKind};

/// Readings kept per slot: 10 minutes of one a second.
pub const SAMPLES: usize = 600;

/// The supervisor's observability state; small and always there, the ring only with
/// `--http`.
#[derive(Default)]
pub struct Observe {
    /// `--drain-delay`.
    pub drain_delay: Duration,
    /// A drain is running: the stop begins when it ends.
    pub draining: bool,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Failed health probes per slot, ever (the worker's own count resets on success).
    pub probe_failures: Vec<u64>,
    pub ring: Option<Ring>,
}

/// One reading: seconds since the epoch, CPU percent of one core, resident KiB.
#[derive(Clone, Copy)]
struct Sample {
    at: u32,
    cpu: f32,
    rss_kib: u32,
}

#[derive(Default)]
pub struct Ring {
    slots: Vec<SlotRing>,
}

#[derive(Default)]
struct SlotRing {
    samples: VecDeque<Sample>,
    /// The worker and CPU reading of the previous sample.
    last: Option<(WorkerId, CpuSample)>,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Observe {
    pub fn probe_failed(&mut self, instance: usize) {
        if self.probe_failures.len() <= instance {
            self.probe_failures.resize(instance + 1, 0);
        }
        self.probe_failures[instance] += 1;
    }
}

impl Supervisor {
    /// Stopping, or holding the stop for `--drain-delay`: what status, `/ready` and the
    /// refusal of new operations go by.
    pub(super) fn winding_down(&self) -> bool {
        self.phase.is_stopping() || self.observe.draining
    }

    /// `--http` and `--drain-delay`, before [`Supervisor::run`].
    pub fn observe_with(&mut self, http: bool, drain_delay: Duration) {
        self.observe.drain_delay = drain_delay;
        if http {
            self.observe.ring = Some(Ring::default());
        }
    }

    /// Whether the one-second tick must run for the sample ring.
    pub(super) fn samples_wanted(&self) -> bool {
        self.observe.ring.is_some()
    }

    /// One reading per slot with a worker, once a second (from the health tick).
    pub(super) fn record_samples(&mut self) {
        let Some(ring) = self.observe.ring.as_mut() else {
            return;
        };
        let at = unix_now() as u32;
        ring.slots.resize_with(self.slots.len(), SlotRing::default);
        for (instance, slot) in self.slots.iter().enumerate() {
            let r = &mut ring.slots[instance];
            let Some(w) = slot.worker.and_then(|id| self.workers.get(&id)) else {
                r.last = None;
                continue;
            };
            let (Some(ticks), Some(rss)) = (self.os.cpu_ticks(w.pid), self.os.rss_bytes(w.pid))
            else {
                continue;
            };
            let now = CpuSample::now(ticks);
            let cpu = match &r.last {
                Some((id, before)) if *id == w.id => now.percent_since(before),
                _ => 0.0,
            };
            r.last = Some((w.id, now));
            if r.samples.len() == SAMPLES {
                r.samples.pop_front();
            }
            r.samples.push_back(Sample {
                at,
                cpu: cpu as f32,
                rss_kib: u32::try_from(rss / 1024).unwrap_or(u32::MAX),
            });
        }
    }

    pub(super) fn on_observe(&mut self, query: Query) {
        match query {
            Query::Readiness(reply) => {
                let _ = reply.send(Readiness {
                    ready: self.ready_slots(),
                    desired: self.live_slots(),
                    stopping: self.winding_down(),
                });
            }
            Query::Status(reply) => {
                let _ = reply.send(Box::new(self.status()));
            }
            Query::Metrics(reply) => {
                let _ = reply.send(Box::new(self.snapshot()));
            }
            Query::Samples(reply) => {
                let _ = reply.send(self.samples_json());
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        let tps = rustix::param::clock_ticks_per_second() as f64;
        let now = unix_now();
        let workers = self
            .workers
            .values()
            .map(|w| WorkerMetrics {
                instance: w.instance,
                worker_id: w.id,
                // A hung worker still counts for its slot until it is gone; it serves nothing.
                ready: w.state().counts_ready() && !w.state().is_hung(),
                rss_bytes: self.os.rss_bytes(w.pid).unwrap_or(0),
                cpu_seconds: self.os.cpu_ticks(w.pid).map_or(0.0, |t| t as f64 / tps),
                connections: w.connections,
                start_time: now - w.started.elapsed().as_secs_f64(),
            })
            .collect();
        let mut states: BTreeMap<&'static str, u64> = herd_proto::control::WorkerState::ALL
            .iter()
            .map(|s| (s.as_str(), 0))
            .collect();
        let mut slots = Vec::new();
        for (instance, slot) in self.slots.iter().enumerate() {
            for id in [slot.worker, slot.incoming].into_iter().flatten() {
                if let Some(w) = self.workers.get(&id) {
                    let shown = super::status::shown_state(w).as_str();
                    *states.entry(shown).or_default() += 1;
                }
            }
            if slot.worker.is_none() && slot.incoming.is_none() {
                let shown = if slot.state.is_errored() {
                    "errored"
                } else {
                    "waiting"
                };
                *states.entry(shown).or_default() += 1;
            }
            slots.push(SlotMetrics {
                instance,
                worker_id: slot.worker.filter(|id| self.workers.contains_key(id)),
                restarts_by_reason: slot.reasons.clone(),
                probe_failures: self
                    .observe
                    .probe_failures
                    .get(instance)
                    .copied()
                    .unwrap_or(0),
            });
        }
        for w in self.workers.values() {
            let current = self
                .slots
                .get(w.instance)
                .is_some_and(|s| s.worker == Some(w.id) || s.incoming == Some(w.id));
            if !current {
                *states.entry("stopping").or_default() += 1;
            }
        }
        let me = std::process::id();
        Snapshot {
            app: self.plan.spec.name.clone(),
            workers,
            slots,
            states,
            reloads_ok: self.observe.reloads_ok,
            reloads_failed: self.observe.reloads_failed,
            supervisor_rss_bytes: self.os.rss_bytes(me).unwrap_or(0),
            supervisor_cpu_seconds: self.os.cpu_ticks(me).map_or(0.0, |t| t as f64 / tps),
            counts_connections: self.plan.kind == WorkerKind::Node
                && self.plan.balance == Balance::RoundRobin,
        }
    }

    /// `{"interval_s":1,"slots":[{"instance":0,"worker_id":3,"pid":…,"restarts":{…},
    /// "t":[…],"cpu":[…],"rss":[…]}]}`: `t` in seconds since the epoch, `cpu` in percent of
    /// one core, `rss` in bytes.
    fn samples_json(&self) -> String {
        let empty = Ring::default();
        let ring = self.observe.ring.as_ref().unwrap_or(&empty);
        let slots: Vec<_> = self
            .slots
            .iter()
            .enumerate()
            .map(|(instance, slot)| {
                let w = slot.worker.and_then(|id| self.workers.get(&id));
                let samples = ring.slots.get(instance).map(|r| &r.samples);
                let column = |f: &dyn Fn(&Sample) -> serde_json::Value| -> Vec<serde_json::Value> {
                    samples.map_or_else(Vec::new, |s| s.iter().map(f).collect())
                };
                json!({
                    "instance": instance,
                    "worker_id": w.map_or(0, |w| w.id),
                    "pid": w.map_or(0, |w| w.pid),
                    "connections": w.map_or(0, |w| w.connections),
                    "restarts": slot.reasons,
                    "t": column(&|s| json!(s.at)),
                    "cpu": column(&|s| json!((f64::from(s.cpu) * 10.0).round() / 10.0)),
                    "rss": column(&|s| json!(u64::from(s.rss_kib) * 1024)),
                })
            })
            .collect();
        json!({ "interval_s": 1, "slots": slots }).to_string()
    }

    /// `herd stop`, SIGTERM or SIGINT while running (`by` says which): the graceful stop,
    /// after `--drain-delay` if one is set.
    pub(super) fn stop_requested(&mut self, by: &str) {
        if self.observe.draining {
            return;
        }
        let delay = self.observe.drain_delay;
        if delay.is_zero() {
            self.logger.event(
                EventName::Stopping,
                None,
                &format!("stopping ({by}): {} workers", self.workers.len()),
                &[],
            );
            self.stop_all(0);
            return;
        }
        self.observe.draining = true;
        self.tell_manager("STOPPING=1");
        self.logger.event(
            EventName::Stopping,
            None,
            &format!(
                "draining ({by}): /ready answers 503; {} workers keep serving for --drain-delay {}, then stop",
                self.workers.len(),
                human(delay)
            ),
            &[("drain_delay_ms", json!(delay.as_millis() as u64))],
        );
        self.after(delay, Event::DrainOver);
    }

    /// The drain is over (or cut short by a second SIGINT): the graceful stop begins.
    pub(super) fn drain_over(&mut self, why: &str) {
        if !self.observe.draining || self.phase.is_stopping() {
            return;
        }
        self.logger.event(
            EventName::Stopping,
            None,
            &format!("stopping ({why}): {} workers", self.workers.len()),
            &[],
        );
        self.stop_all(0);
    }

    /// A reload ended (`ok` or failed), for `herd_reloads_total`.
    pub(super) fn count_reload(&mut self, ok: bool) {
        if ok {
            self.observe.reloads_ok += 1;
        } else {
            self.observe.reloads_failed += 1;
        }
    }
}
