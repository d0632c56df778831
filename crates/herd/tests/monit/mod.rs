//! `herd monit` (the terminal dashboard, driven in a tmux pane), `herd restart NAME
//! --instance N` (one worker replaced like one step of a reload) and `herd status NAME
//! --watch` / `herd ls --watch` into a pipe.

mod pane;
mod restart;
mod tui;
mod watch;

use std::path::Path;

use serde_json::Value;

use crate::util::{start_named_node, wait_status, workers, Herd};

/// `herd run -i N … fixtures/control_app.js` (real node, the harness's JSON output).
fn start_node(name: &str, instances: usize, extra: &[&str]) -> Herd {
    start_named_node("control_app.js", name, instances, extra)
}

/// Every worker's pid by instance, once `n` workers are ready and nothing else runs.
fn settled_pids(home: &Path, name: &str, n: usize) -> Vec<u32> {
    let s = wait_status(home, name, &format!("{n} workers ready"), |s| settled(s, n));
    pids_by_instance(&s)
}

fn settled(s: &Value, n: usize) -> bool {
    s["state"] == "running"
        && s["ready"] == n
        && workers(s).len() == n
        && workers(s).iter().all(|w| w["state"] == "ready")
}

fn pids_by_instance(s: &Value) -> Vec<u32> {
    let mut ws: Vec<(u64, u32)> = workers(s)
        .iter()
        .map(|w| {
            (
                w["instance"].as_u64().expect("instance"),
                w["pid"].as_u64().expect("pid") as u32,
            )
        })
        .collect();
    ws.sort();
    ws.into_iter().map(|(_, pid)| pid).collect()
}
