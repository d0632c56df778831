//! `/metrics`: clean for promtool, and values that follow what happens to the workers.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{get, samples, start_with_http, value};
use crate::util::{self, kill, poll_until, prerequisite_missing, WAIT};

const METRICS: [&str; 14] = [
    "herd_worker_up",
    "herd_worker_ready",
    "herd_worker_rss_bytes",
    "herd_worker_cpu_seconds_total",
    "herd_worker_connections_total",
    "herd_worker_restarts_total",
    "herd_worker_start_time_seconds",
    "herd_probe_failures_total",
    "herd_workers",
    "herd_reloads_total",
    "herd_supervisor_rss_bytes",
    "herd_supervisor_cpu_seconds_total",
    "herd_build_info",
    "herd_http_refused_connections_total",
];

#[test]
fn metrics_list_every_series_and_pass_promtool() {
    let (herd, addr) = start_with_http("app.js", "http-prom", 2, &[]);
    herd.wait_ready();
    let reply = get(addr, "/metrics");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(
        reply.head.contains("text/plain; version=0.0.4"),
        "{}",
        reply.head
    );
    for name in METRICS {
        assert!(
            reply.body.contains(&format!("# TYPE {name} ")),
            "no {name} in\n{}",
            reply.body
        );
    }
    let up = samples(&reply.body, "herd_worker_up", "app=\"http-prom\"");
    assert_eq!(up.len(), 2, "one up series per slot: {up:?}");
    assert!(up.iter().all(|(_, v)| *v == 1.0), "{up:?}");
    let rss = samples(&reply.body, "herd_worker_rss_bytes", "worker_id=");
    assert!(
        rss.len() == 2 && rss.iter().all(|(_, v)| *v > 1e6),
        "{rss:?}"
    );

    let Ok(mut promtool) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        prerequisite_missing("promtool (Debian package prometheus) for `promtool check metrics`");
        return;
    };
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(reply.body.as_bytes())
        .expect("write to promtool");
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        reply.body
    );
}

#[test]
fn restarts_total_rises_after_a_worker_is_killed() {
    let (herd, addr) = start_with_http("app.js", "http-kill", 2, &[]);
    herd.wait_ready();
    let crash = r#"herd_worker_restarts_total{app="http-kill",instance="0",reason="crash"}"#;
    let before = get(addr, "/metrics").body;
    assert_eq!(value(&before, crash), Some(0.0), "{before}");
    let spawned = herd.wait_event("instance 0's worker", |e| {
        e["event"] == "spawned" && e["instance"] == 0
    });
    let pid = spawned["pid"].as_u64().expect("pid") as u32;
    let id = spawned["worker_id"].clone();
    let up = format!(r#"herd_worker_up{{app="http-kill",instance="0",worker_id="{id}"}}"#);
    assert_eq!(value(&before, &up), Some(1.0), "{before}");
    kill(pid, libc::SIGKILL);
    let after = poll_until("restarts_total to count the kill", || {
        let m = get(addr, "/metrics").body;
        (value(&m, crash) == Some(1.0)).then_some(m)
    });
    assert_eq!(
        value(
            &after,
            r#"herd_worker_restarts_total{app="http-kill",instance="1",reason="crash"}"#
        ),
        Some(0.0),
        "the other slot: {after}"
    );
    // The killed worker's own series are gone once it is reaped.
    assert_eq!(value(&after, &up), None, "{after}");
}

#[test]
fn the_ready_gauge_falls_when_a_worker_hangs() {
    // health_app.js `/stop` answers, then SIGSTOPs itself; --watchdog finds it hung, takes
    // it out of routing and kills it after a grace (tests/health/hang.rs does the same).
    let (herd, addr) = start_with_http("health_app.js", "http-hang", 2, &["--watchdog", "1s"]);
    herd.wait_ready();
    let port = herd.port();
    let answer = util::get(port, "/stop").expect("/stop answers");
    let victim = util::pid_in(&answer);
    let spawned = herd.wait_event("the victim's spawn", |e| {
        e["event"] == "spawned" && e["pid"] == victim
    });
    let series = format!(
        r#"herd_worker_ready{{app="http-hang",instance="{}",worker_id="{}"}}"#,
        spawned["instance"], spawned["worker_id"]
    );
    let ready_of = |m: &str| value(m, &series);
    let first = get(addr, "/metrics").body;
    // Either still 1 (not found hung yet) or already 0: never absent while it lives.
    assert!(ready_of(&first).is_some(), "{first}");
    // Poll until the victim shows 0 (hung, not yet killed), while it still exists.
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let m = get(addr, "/metrics").body;
        let v = ready_of(&m);
        seen.push(v);
        if v == Some(0.0) {
            let ready = value(&m, r#"herd_workers{app="http-hang",state="ready"}"#);
            assert_eq!(ready, Some(1.0), "one worker left ready: {m}");
            break;
        }
        assert!(
            Instant::now() < deadline && (v.is_some() || seen.len() < 2),
            "the hung worker's ready gauge never read 0 before it went away: {seen:?}\n{}",
            herd.dump()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    herd.wait_named("hung");
}
