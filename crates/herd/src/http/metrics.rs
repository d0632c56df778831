//! `/metrics`: a [`Snapshot`] in the Prometheus text format (0.0.4), through the
//! `prometheus-client` crate. A fresh registry per scrape: the values are the supervisor's
//! own counts at that moment, so nothing is kept between scrapes.
//!
//! Per worker process (labels `app`, `instance`, `worker_id`): `herd_worker_ready`,
//! `herd_worker_rss_bytes`, `herd_worker_cpu_seconds_total`, `herd_worker_start_time_seconds`,
//! and `herd_worker_connections_total` where herd hands connections over (round-robin).
//! Per slot (`app`, `instance`; `worker_id` is its current worker, empty when it has none):
//! `herd_worker_up`; per slot, counting over its workers (`app`, `instance`):
//! `herd_worker_restarts_total{reason}` and `herd_probe_failures_total` — a restart makes a
//! new worker id, and a counter must not start again at 0 with it. Per app: `herd_workers{state}`,
//! `herd_reloads_total{result}`, `herd_supervisor_rss_bytes`,
//! `herd_supervisor_cpu_seconds_total`, `herd_build_info{version}`, and the HTTP server's
//! own `herd_http_refused_connections_total` and `herd_http_skipped_events_total`.

use std::sync::atomic::AtomicU64;

use herd_proto::control::Reason;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::Snapshot;

pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

type Labels = Vec<(&'static str, String)>;
type GaugeF = Family<Labels, Gauge<f64, AtomicU64>>;
type CounterF = Family<Labels, Counter<f64, AtomicU64>>;

/// The HTTP server's own counts.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpCounters {
    pub refused: u64,
    pub skipped: u64,
}

struct Builder {
    registry: Registry,
}

impl Builder {
    fn gauge(&mut self, name: &str, help: &str, unit: Option<Unit>) -> GaugeF {
        self.family(name, help, unit)
    }

    /// `name` without `_total` (the encoder adds it).
    fn counter(&mut self, name: &str, help: &str, unit: Option<Unit>) -> CounterF {
        self.family(name, help, unit)
    }

    fn family<M>(&mut self, name: &str, help: &str, unit: Option<Unit>) -> M
    where
        M: prometheus_client::registry::Metric + Clone + Default,
    {
        let family = M::default();
        match unit {
            Some(unit) => self
                .registry
                .register_with_unit(name, help, unit, family.clone()),
            None => self.registry.register(name, help, family.clone()),
        }
        family
    }
}

pub fn render(s: &Snapshot, http: HttpCounters) -> String {
    let mut b = Builder {
        registry: Registry::default(),
    };
    let app = || ("app", s.app.clone());
    let worker = |instance: usize, id: u64| -> Labels {
        vec![
            app(),
            ("instance", instance.to_string()),
            ("worker_id", id.to_string()),
        ]
    };

    let up = b.gauge(
        "herd_worker_up",
        "1 while the slot has a running worker, 0 while it waits for a restart or gave up",
        None,
    );
    for slot in &s.slots {
        up.get_or_create(&vec![
            app(),
            ("instance", slot.instance.to_string()),
            (
                "worker_id",
                slot.worker_id.map_or(String::new(), |id| id.to_string()),
            ),
        ])
        .set(if slot.worker_id.is_some() { 1.0 } else { 0.0 });
    }
    let ready = b.gauge(
        "herd_worker_ready",
        "1 while the worker is ready and counted as serving",
        None,
    );
    let rss = b.gauge(
        "herd_worker_rss",
        "Resident memory of the worker process",
        Some(Unit::Bytes),
    );
    let cpu = b.counter(
        "herd_worker_cpu",
        "CPU time (user and system) the worker process used",
        Some(Unit::Seconds),
    );
    let start = b.gauge(
        "herd_worker_start_time",
        "When the worker started, seconds since the epoch",
        Some(Unit::Seconds),
    );
    let conns = s.counts_connections.then(|| {
        b.counter(
            "herd_worker_connections",
            "Connections herd handed to the worker (round-robin)",
            None,
        )
    });
    for w in &s.workers {
        let l = worker(w.instance, w.worker_id);
        ready.get_or_create(&l).set(if w.ready { 1.0 } else { 0.0 });
        rss.get_or_create(&l).set(w.rss_bytes as f64);
        cpu.get_or_create(&l).inc_by(w.cpu_seconds);
        start.get_or_create(&l).set(w.start_time);
        if let Some(c) = &conns {
            c.get_or_create(&l).inc_by(w.connections as f64);
        }
    }
    let restarts = b.counter(
        "herd_worker_restarts",
        "Replacements of the slot's worker by reason, since herd started",
        None,
    );
    let probes = b.counter(
        "herd_probe_failures",
        "Failed health probes of the slot's workers, since herd started",
        None,
    );
    for slot in &s.slots {
        let instance = slot.instance.to_string();
        for reason in Reason::ALL {
            let n = slot.restarts_by_reason.get(reason).copied().unwrap_or(0);
            restarts
                .get_or_create(&vec![
                    app(),
                    ("instance", instance.clone()),
                    ("reason", reason.as_str().to_string()),
                ])
                .inc_by(f64::from(n));
        }
        probes
            .get_or_create(&vec![app(), ("instance", instance)])
            .inc_by(slot.probe_failures as f64);
    }
    let states = b.gauge(
        "herd_workers",
        "Workers (and empty slots) by the state herd status shows",
        None,
    );
    for (state, n) in &s.states {
        states
            .get_or_create(&vec![app(), ("state", (*state).to_string())])
            .set(*n as f64);
    }
    let reloads = b.counter("herd_reloads", "Rolling reloads by outcome", None);
    for (result, n) in [("ok", s.reloads_ok), ("failed", s.reloads_failed)] {
        reloads
            .get_or_create(&vec![app(), ("result", result.to_string())])
            .inc_by(n as f64);
    }
    b.gauge(
        "herd_supervisor_rss",
        "Resident memory of the herd supervisor",
        Some(Unit::Bytes),
    )
    .get_or_create(&vec![app()])
    .set(s.supervisor_rss_bytes as f64);
    b.counter(
        "herd_supervisor_cpu",
        "CPU time (user and system) the herd supervisor used",
        Some(Unit::Seconds),
    )
    .get_or_create(&vec![app()])
    .inc_by(s.supervisor_cpu_seconds);
    b.gauge("herd_build_info", "herd's version; always 1", None)
        .get_or_create(&vec![
            app(),
            ("version", env!("CARGO_PKG_VERSION").to_string()),
        ])
        .set(1.0);
    b.counter(
        "herd_http_refused_connections",
        "Connections to --http closed unanswered because too many were open",
        None,
    )
    .get_or_create(&vec![app()])
    .inc_by(http.refused as f64);
    b.counter(
        "herd_http_skipped_events",
        "Events /events clients skipped because they read too slowly",
        None,
    )
    .get_or_create(&vec![app()])
    .inc_by(http.skipped as f64);

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_text::encode(&mut out, &b.registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{SlotMetrics, WorkerMetrics};

    #[test]
    fn every_metric_is_there_with_its_labels() {
        let s = Snapshot {
            app: "web".into(),
            workers: vec![WorkerMetrics {
                instance: 0,
                worker_id: 7,
                ready: true,
                rss_bytes: 1024,
                cpu_seconds: 1.5,
                connections: 3,
                start_time: 1_700_000_000.0,
            }],
            slots: vec![
                SlotMetrics {
                    instance: 0,
                    worker_id: Some(7),
                    restarts_by_reason: [(Reason::Crash, 2)].into_iter().collect(),
                    probe_failures: 1,
                },
                SlotMetrics {
                    instance: 1,
                    ..Default::default()
                },
            ],
            states: [("ready", 1), ("waiting", 1)].into_iter().collect(),
            reloads_ok: 1,
            reloads_failed: 0,
            supervisor_rss_bytes: 4096,
            supervisor_cpu_seconds: 0.25,
            counts_connections: true,
        };
        let text = render(&s, HttpCounters::default());
        for line in [
            r#"herd_worker_up{app="web",instance="0",worker_id="7"} 1"#,
            r#"herd_worker_up{app="web",instance="1",worker_id=""} 0"#,
            r#"herd_worker_ready{app="web",instance="0",worker_id="7"} 1"#,
            r#"herd_worker_rss_bytes{app="web",instance="0",worker_id="7"} 1024"#,
            r#"herd_worker_cpu_seconds_total{app="web",instance="0",worker_id="7"} 1.5"#,
            r#"herd_worker_connections_total{app="web",instance="0",worker_id="7"} 3"#,
            r#"herd_worker_start_time_seconds{app="web",instance="0",worker_id="7"} 1700000000"#,
            r#"herd_worker_restarts_total{app="web",instance="0",reason="crash"} 2"#,
            r#"herd_worker_restarts_total{app="web",instance="1",reason="hung"} 0"#,
            r#"herd_probe_failures_total{app="web",instance="0"} 1"#,
            r#"herd_workers{app="web",state="waiting"} 1"#,
            r#"herd_reloads_total{app="web",result="ok"} 1"#,
            r#"herd_supervisor_rss_bytes{app="web"} 4096"#,
            r#"herd_supervisor_cpu_seconds_total{app="web"} 0.25"#,
            r#"herd_build_info{app="web",version=""#,
        ] {
            assert!(text.contains(line), "missing {line}\n{text}");
        }
    }
}
