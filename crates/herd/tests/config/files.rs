//! Loading a herd.toml: errors that point into the file, `herd start FILE` for every app,
//! `herd run FILE --app NAME` in the foreground, and `herd ls` naming the file.

use std::time::Duration;

use super::{hello, port_in, Site};
use crate::util::{spawn_cli, wait_status, WAIT};

const TWO_APPS: &str = r#"
# A Node cluster app and a socket-activation Python app.
[apps.web]
script = "config_app.js"
instances = 2
listen = ["127.0.0.1:0"]
[apps.web.env]
GREETING = "hello"

[apps.api]
command = ["python3", "control_server.py"]
instances = 2
listen = ["127.0.0.1:0"]
ready = "notify"
"#;

#[test]
fn config_errors_name_file_line_column_and_the_nearest_key() {
    let site = Site::new(&[]);
    let file = site.file_str();
    site.write("[apps.web]\ncommand = [\"python3\", \"x.py\"]\n\ninstaces = 4\n");
    let out = site.herd(&["start", &file]);
    assert_ne!(out.code, Some(0), "{out}");
    let want = format!("unknown key \"instaces\" at {file}:4:1 — did you mean \"instances\"?");
    assert!(out.stderr.contains(&want), "wanted {want:?}\n{out}");

    site.write("[apps.web]\ncommand = [\"python3\", \"x.py\"]\ninstances = 0\n");
    let out = site.herd(&["apply", "--dry-run", &file]);
    assert_ne!(out.code, Some(0), "{out}");
    let want = format!("{file}:3:13: instances: must be at least 1");
    assert!(out.stderr.contains(&want), "wanted {want:?}\n{out}");

    site.write("[apps.web]\ncommand = [\"python3\", \"x.py\"]\nlisten = { port = 3 }\n");
    let out = site.herd(&["run", &file]);
    assert_ne!(out.code, Some(0), "{out}");
    let want = format!("{file}:3:10: listen: expected a string or an array of strings, found");
    assert!(out.stderr.contains(&want), "wanted {want:?}\n{out}");

    site.write("versoin = 2\n[apps.web]\ncommand = [\"python3\", \"x.py\"]\n");
    let out = site.herd(&["start", &file]);
    assert!(
        out.stderr
            .contains(&format!("unknown key \"versoin\" at {file}:1:1")),
        "{out}"
    );

    // Options belong in the file.
    site.write("[apps.web]\ncommand = [\"python3\", \"x.py\"]\n");
    let out = site.herd(&["start", "-i", "3", &file]);
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("--instances given with"), "{out}");
    // Nothing was started by any of these.
    let ls = site.herd(&["ls"]);
    assert!(ls.stdout.contains("no apps running"), "{ls}");
}

#[test]
fn herd_start_file_starts_every_app_and_ls_names_the_file() {
    let site = Site::new(&["config_app.js", "control_server.py"]);
    site.write(TWO_APPS);
    site.track("web");
    site.track("api");
    // From another directory: relative paths in the file are relative to the file.
    let out = site.herd(&["start", &site.file_str()]);
    out.assert_ok();
    let web = site.status("web");
    let api = site.status("api");
    assert_eq!(web["ready"], 2, "{web:#}");
    assert_eq!(api["ready"], 2, "{api:#}");
    assert_eq!(web["config"], site.file_str().as_str());
    assert_eq!(hello(port_in(&web))["greeting"], "hello");
    let r = crate::util::get(port_in(&api), "/").expect("api answers");
    assert_eq!(r.status, 200, "{r:?}");
    let ls = site.herd(&["ls"]);
    ls.assert_ok();
    for name in ["web", "api"] {
        let line = ls
            .stdout
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in\n{ls}"));
        assert!(line.contains(&site.file_str()), "{ls}");
    }
    // A command-line app shows `-`.
    assert!(ls.stdout.contains("config"), "{ls}");
}

#[test]
fn herd_run_file_app_runs_one_app_in_the_foreground() {
    let site = Site::new(&["config_app.js", "control_server.py"]);
    site.write(TWO_APPS);
    let file = site.file_str();
    // Two apps and no --app: which one?
    let out = site.herd(&["run", &file]);
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("pick one with --app NAME"), "{out}");
    assert!(
        out.stderr.contains("web") && out.stderr.contains("api"),
        "{out}"
    );

    site.track("web");
    let run = spawn_cli(&site.home(), &["run", &file, "--app", "web"]);
    crate::util::poll_until("web's control socket", || {
        (crate::util::cli(&site.home(), &["status", "web"]).code == Some(0)).then_some(())
    });
    let s = wait_status(&site.home(), "web", "web ready", |s| s["ready"] == 2);
    assert_eq!(hello(port_in(&s))["app"], "web");
    let api = crate::util::cli(&site.home(), &["status", "api"]);
    assert_ne!(api.code, Some(0), "only web runs\n{api}");
    site.herd(&["stop", "web"]).assert_ok();
    let out = run.finish(WAIT + Duration::from_secs(5));
    assert_eq!(out.code, Some(0), "{out}");
}
