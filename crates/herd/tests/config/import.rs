//! `herd import`: a realistic PM2 ecosystem file → herd.toml → `herd start` → both apps
//! serve with the env of `--env production`.

use super::{hello, port_in, Site};
use crate::util::wait_status;

#[test]
fn import_of_a_multi_app_ecosystem_file_starts_and_serves() {
    let site = Site::new(&["config_app.js", "config_ecosystem.config.js"]);
    let eco = site.file().with_file_name("config_ecosystem.config.js");
    let out = site.herd(&["import", &eco.to_string_lossy(), "--env", "production"]);
    out.assert_ok();
    let toml = &out.stdout;
    assert!(
        toml.contains("[apps.web]") && toml.contains("[apps.jobs]"),
        "{toml}"
    );
    assert!(toml.contains("max_memory = \"300M\""), "{toml}");
    assert!(toml.contains("kill_timeout = \"3000ms\""), "{toml}");
    assert!(toml.contains("restart_delay = \"100ms\""), "{toml}");
    assert!(
        toml.contains("# not mapped (no herd equivalent): cron_restart"),
        "{toml}"
    );
    assert!(
        toml.contains("# not mapped (no herd equivalent): watch = false"),
        "{toml}"
    );
    assert!(
        toml.contains("exec_mode = \\\"fork\\\"") || toml.contains("exec_mode = \"fork\""),
        "{toml}"
    );
    assert!(
        toml.contains("command = [\"node\", \"--max-old-space-size=128\""),
        "{toml}"
    );
    site.write(toml);
    site.track("web");
    site.track("jobs");
    site.herd(&["start", &site.file_str()]).assert_ok();
    let web = wait_status(&site.home(), "web", "web ready", |s| s["ready"] == 2);
    site.status("web");
    let jobs = site.status("jobs");
    assert_eq!(
        hello(port_in(&web))["greeting"],
        "prod",
        "env_production over env"
    );
    assert_eq!(hello(port_in(&jobs))["greeting"], "jobs");
    assert_eq!(jobs["config"], site.file_str().as_str());
}
