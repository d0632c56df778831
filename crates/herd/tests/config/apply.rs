//! `herd apply`: one line per app and what it did to the running app, measured (pids
//! replaced, requests failed under a bounded load). Each step prints a `measured:` line
//! (run with --nocapture to see them).

use std::collections::BTreeSet;

use super::{hello, port_in, Load, Site};
use crate::util::{all_pids, cli, fixture, ready_pids, wait_status};

fn web(greeting: &str, instances: usize, listen: &str, extra: &str) -> String {
    format!(
        r#"[apps.web]
script = "config_app.js"
instances = {instances}
listen = ["{listen}"]
{extra}
[apps.web.env]
GREETING = "{greeting}"
"#
    )
}

const API: &str = r#"
[apps.api]
command = ["python3", "control_server.py"]
instances = 1
listen = ["127.0.0.1:0"]
ready = "notify"
"#;

fn apply(site: &Site, dry_run: bool) -> crate::util::CliOutput {
    let file = site.file_str();
    let mut args = vec!["apply"];
    if dry_run {
        args.push("--dry-run");
    }
    args.push(&file);
    site.herd(&args)
}

fn settled(site: &Site, n: usize) -> serde_json::Value {
    wait_status(&site.home(), "web", "web settled", |s| {
        s["state"] == "running"
            && s["ready"] == n
            && ready_pids(s).len() == n
            && all_pids(s).len() == n
    })
}

#[test]
fn apply_plans_and_does_each_kind_of_change() {
    let site = Site::new(&["config_app.js", "control_server.py"]);
    site.track("web");
    site.track("api");
    site.write(&web("hello", 2, "127.0.0.1:0", ""));
    site.herd(&["start", &site.file_str()]).assert_ok();
    let s = settled(&site, 2);
    let port = port_in(&s);
    let pids0 = ready_pids(&s);
    let sup0 = s["pid"].as_u64();

    // Unchanged.
    let out = apply(&site, false);
    out.assert_ok();
    assert_eq!(out.stdout.trim(), "web: unchanged", "{out}");
    assert_eq!(ready_pids(&site.status("web")), pids0);
    eprintln!("measured: unchanged: 0 of 2 pids replaced");

    // Dry run of an env change: the plan, nothing done.
    site.write(&web("bonjour", 2, "127.0.0.1:0", ""));
    let out = apply(&site, true);
    out.assert_ok();
    assert_eq!(out.stdout.trim(), "web: reload (env changed)", "{out}");
    assert_eq!(ready_pids(&site.status("web")), pids0);
    assert_eq!(hello(port)["greeting"], "hello");

    // The env change, under load: a rolling reload onto the new spec.
    let load = Load::start(port);
    load.wait_for(20);
    let out = apply(&site, false);
    out.assert_ok();
    assert!(out.stdout.contains("web: reload (env changed)"), "{out}");
    let (ok, failed, errors) = load.finish(20);
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed: {errors:?}",
        ok + failed
    );
    let s = settled(&site, 2);
    let pids1 = ready_pids(&s);
    assert!(
        pids1.is_disjoint(&pids0),
        "every worker replaced: {pids0:?} → {pids1:?}"
    );
    assert_eq!(s["pid"].as_u64(), sup0, "same supervisor");
    for _ in 0..4 {
        assert_eq!(hello(port)["greeting"], "bonjour");
    }
    eprintln!(
        "measured: reload (env): 2 of 2 pids replaced, {failed} of {} requests failed under load",
        ok + failed
    );

    // Only instances: a scale; the workers stay.
    site.write(&web("bonjour", 3, "127.0.0.1:0", ""));
    let out = apply(&site, false);
    out.assert_ok();
    assert!(out.stdout.contains("web: scale 2→3"), "{out}");
    let s = settled(&site, 3);
    assert!(ready_pids(&s).is_superset(&pids1), "the two workers stay");
    eprintln!("measured: scale 2→3: 0 of 2 pids replaced, 1 started");
    let pids2 = ready_pids(&s);

    // A new spec that never becomes ready: the reload rolls back, old workers and old
    // spec stay, and apply fails.
    site.write(&web("broken", 3, "127.0.0.1:0", "").replace(
        "GREETING = \"broken\"",
        "GREETING = \"broken\"\nFAIL_START = \"1\"",
    ));
    let load = Load::start(port);
    load.wait_for(10);
    let out = apply(&site, false);
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("failed to become ready"), "{out}");
    let (ok, failed, errors) = load.finish(10);
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed: {errors:?}",
        ok + failed
    );
    let s = settled(&site, 3);
    assert_eq!(ready_pids(&s), pids2, "the old workers stay");
    let args: Vec<&str> = s["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(
        args.contains(&"--env=GREETING=bonjour"),
        "the old spec stays: {args:?}"
    );
    assert_eq!(hello(port)["greeting"], "bonjour");
    // A crash restart after the rollback starts the old version, not the broken one.
    let victim = *pids2.iter().next().expect("a pid");
    crate::util::kill(victim, libc::SIGKILL);
    let s = wait_status(&site.home(), "web", "crash restart", |s| {
        s["ready"] == 3 && !ready_pids(s).contains(&victim) && ready_pids(s).len() == 3
    });
    assert_eq!(s["state"], "running");
    for _ in 0..6 {
        assert_eq!(hello(port)["greeting"], "bonjour");
    }
    eprintln!("measured: failed reload: 0 of 3 pids replaced, {failed} of {} requests failed, old spec kept", ok + failed);

    // A new app in the file: started; web unchanged.
    let mut file = web("bonjour", 3, "127.0.0.1:0", "");
    file.push_str(API);
    site.write(&file);
    let out = apply(&site, true);
    assert!(
        out.stdout.contains("web: unchanged") && out.stdout.contains("api: start"),
        "{out}"
    );
    assert!(
        cli(&site.home(), &["status", "api"]).code != Some(0),
        "dry run started nothing"
    );
    apply(&site, false).assert_ok();
    let api = site.status("api");
    assert_eq!(api["ready"], 1, "{api:#}");
    assert_eq!(api["config"], site.file_str().as_str());

    // Listen changed: a restart (stop, then start) — the only change that drops connections.
    let mut file = web("bonjour", 3, "127.0.0.2:0", "");
    file.push_str(API);
    site.write(&file);
    let out = apply(&site, false);
    out.assert_ok();
    assert!(
        out.stdout
            .contains("web: restart (listen changed: drops in-flight connections)"),
        "{out}"
    );
    let s = settled(&site, 3);
    assert_ne!(s["pid"].as_u64(), sup0, "a new supervisor");
    assert!(
        s["listen"][0]
            .as_str()
            .is_some_and(|l| l.starts_with("127.0.0.2:")),
        "{s:#}"
    );
    assert!(ready_pids(&s).is_disjoint(&pids2));
    eprintln!("measured: restart (listen): 3 of 3 pids and the supervisor replaced");

    // api removed from the file: stopped. An app from the command line is never touched.
    site.write(&web("bonjour", 3, "127.0.0.2:0", ""));
    let other = fixture("control_server.py");
    site.track("other");
    cli(
        &site.home(),
        &[
            "start",
            "-i",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--ready",
            "notify",
            "--name",
            "other",
            "python3",
            &other,
        ],
    )
    .assert_ok();
    let out = apply(&site, false);
    out.assert_ok();
    assert!(out.stdout.contains("api: stop"), "{out}");
    assert!(!out.stdout.contains("other"), "{out}");
    assert!(
        cli(&site.home(), &["status", "api"]).code != Some(0),
        "api stopped"
    );
    assert_eq!(
        site.status("other")["ready"],
        1,
        "the command-line app still runs"
    );

    // An app of the file whose name a command-line app holds: reported, untouched, failure.
    let mut file = web("bonjour", 3, "127.0.0.2:0", "");
    file.push_str(&API.replace("[apps.api]", "[apps.other]"));
    site.write(&file);
    let before: BTreeSet<u32> = ready_pids(&site.status("other"));
    let out = apply(&site, false);
    assert_ne!(out.code, Some(0), "{out}");
    assert!(
        out.stdout
            .contains("other: skipped: an app of this name runs from the command line"),
        "{out}"
    );
    assert_eq!(ready_pids(&site.status("other")), before);
}
