//! `herd import ecosystem.config.js [--env NAME]`: a PM2 ecosystem file as a herd.toml.
//!
//! The file is JavaScript, so node evaluates it (`node -e IMPORT_JS FILE`, no shell) and
//! prints its `apps` as JSON; each app becomes an `[apps.NAME]` table. What has a herd
//! equivalent is mapped (see the table in docs/config.md); every other key is listed as a
//! comment on its app, so nothing is dropped silently. PM2's defaults that differ from
//! herd's are written out (PM2 runs 1 instance unless told otherwise; herd `max`).

use crate::cli::clean_name;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Map, Value};

use crate::config::keys;
use crate::print::outln;

const IMPORT_JS: &str = include_str!("import.js");

/// The most JSON node may print for one ecosystem file.
const MAX_JSON: u64 = 16 << 20;

pub fn import(file: &Path, env: Option<&str>) -> anyhow::Result<u8> {
    let abs = std::path::absolute(file)?;
    if !abs.is_file() {
        anyhow::bail!("{}: no such file", file.display());
    }
    let output = Command::new("node")
        .arg("-e")
        .arg(IMPORT_JS)
        .arg(&abs)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot run node to read {} (it is JavaScript): {e}; install Node.js",
                file.display()
            )
        })?;
    let mut child = output;
    let mut json = Vec::new();
    use std::io::Read;
    if let Some(out) = child.stdout.take() {
        out.take(MAX_JSON).read_to_end(&mut json)?;
    }
    let mut err = Vec::new();
    if let Some(e) = child.stderr.take() {
        e.take(64 * 1024).read_to_end(&mut err)?;
    }
    let status = child.wait()?;
    if !status.success() {
        let err = String::from_utf8_lossy(&err);
        let first = err.lines().next().unwrap_or("").trim();
        anyhow::bail!("node could not load {}: {first}", file.display());
    }
    let apps: Vec<Value> = serde_json::from_slice(&json)
        .map_err(|e| anyhow::anyhow!("{}: node printed no list of apps ({e})", file.display()))?;
    let text = to_toml(&apps, env, &file.display().to_string(), cores());
    outln!("{}", text.trim_end())?;
    Ok(0)
}

/// The CPUs herd's `max` would use here (affinity and cgroup quota), for PM2's `-N`.
fn cores() -> usize {
    crate::cpus::available()
}

/// A TOML string (basic, escaped).
fn quote(s: &str) -> String {
    let json = serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    // JSON escapes every control character but DEL, which TOML forbids raw.
    json.replace('\u{7f}', "\\u007F")
}

/// A TOML key: bare when it can be.
fn key(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        s.to_string()
    } else {
        quote(s)
    }
}

/// A comment line's text: one line, no control characters.
fn comment(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// PM2 milliseconds (a number, or a string with or without a unit) as a herd duration.
fn millis(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .filter(|n| *n >= 0.0)
            .map(|n| format!("{}ms", n.round() as u64)),
        Value::String(s)
            if s.trim().chars().all(|c| c.is_ascii_digit()) && !s.trim().is_empty() =>
        {
            Some(format!("{}ms", s.trim()))
        }
        Value::String(s) if crate::spec::parse_duration(s).is_ok() => Some(s.trim().to_string()),
        _ => None,
    }
}

/// Splits PM2's `args: "a b 'c d'"` as its own parser does (spaces, simple quotes).
fn split_args(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            (None, c) => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn string_list(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(split_args(s)),
        Value::Array(items) => items.iter().map(scalar).collect(),
        _ => None,
    }
}

fn array(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quote(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// PM2's `instances`: a count, `0`/`"max"` for every CPU, `-N` for every CPU but N.
fn instances(v: &Value, cores: usize) -> Result<(String, Option<String>), String> {
    let n = match v {
        Value::String(s) if s == "max" => return Ok(("\"max\"".into(), None)),
        Value::String(s) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| format!("instances = {s:?} is not a count"))?,
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| format!("instances = {n} is not a count"))?,
        other => return Err(format!("instances = {other} is not a count")),
    };
    Ok(match n {
        0 => ("\"max\"".into(), None),
        n if n > 0 => (n.to_string(), None),
        n => {
            let count = (cores as i64 + n).max(1);
            (
                count.to_string(),
                Some(format!(
                    "PM2 instances = {n} (every CPU but {}): {count} on the machine that ran herd import; herd has no such value",
                    -n
                )),
            )
        }
    })
}

/// The herd.toml for `apps`.
pub fn to_toml(apps: &[Value], env: Option<&str>, source: &str, cores: usize) -> String {
    let flags: Vec<String> = keys::flag_keys().into_iter().map(|k| k.key).collect();
    let has = |k: &str| flags.iter().any(|f| f == k);
    let mut out = format!(
        "# herd.toml imported from {} by herd import{}.\n# Keys: docs/config.md. Check the notes on each app.\n",
        comment(source),
        env.map(|e| format!(" --env {}", comment(e))).unwrap_or_default()
    );
    let mut names: Vec<String> = Vec::new();
    for (index, app) in apps.iter().enumerate() {
        let empty = Map::new();
        let app = app.as_object().unwrap_or(&empty);
        let mut lines: Vec<String> = Vec::new();
        let mut notes: Vec<String> = Vec::new();
        let mut unmapped: Vec<String> = Vec::new();
        let script = app.get("script").and_then(scalar).unwrap_or_default();
        let name = app
            .get("name")
            .and_then(scalar)
            .map(|n| clean_name(&n))
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| {
                clean_name(
                    Path::new(&script)
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .as_deref()
                        .unwrap_or(""),
                )
            });
        let mut name = if name.is_empty() {
            format!("app{index}")
        } else {
            name
        };
        while names.contains(&name) {
            name.push_str("_2");
        }
        names.push(name.clone());
        let mut args: Vec<String> = app.get("args").and_then(string_list).unwrap_or_default();
        let node_args = app
            .get("node_args")
            .or_else(|| app.get("interpreter_args"))
            .and_then(string_list)
            .unwrap_or_default();
        let interpreter = app.get("interpreter").and_then(scalar);
        match (&interpreter, node_args.is_empty()) {
            (Some(i), _) if i == "none" => {
                let mut command = vec![script.clone()];
                command.append(&mut args);
                lines.push(format!("command = {}", array(&command)));
            }
            (i, false) => {
                // Interpreter options: the interpreter is the program (`node` stays a Node
                // cluster worker).
                let mut command = vec![i.clone().unwrap_or_else(|| "node".into())];
                command.extend(node_args.iter().cloned());
                command.push(script.clone());
                command.append(&mut args);
                lines.push(format!("command = {}", array(&command)));
            }
            (i, true) => {
                lines.push(format!("script = {}", quote(&script)));
                if !args.is_empty() {
                    lines.push(format!("args = {}", array(&args)));
                }
                if let Some(i) = i {
                    lines.push(format!("interpreter = {}", quote(i)));
                }
            }
        }
        if script.is_empty() {
            notes.push("no script in the PM2 app: set command or script".into());
        }
        match app.get("instances").map(|v| instances(v, cores)) {
            None => lines.push("instances = 1".into()),
            Some(Ok((value, note))) => {
                lines.push(format!("instances = {value}"));
                notes.extend(note);
            }
            Some(Err(e)) => {
                lines.push("instances = 1".into());
                notes.push(e);
            }
        }
        let mut restart_delay = None;
        for (k, v) in app {
            let k = k.as_str();
            let mapped = match k {
                "name" | "script" | "args" | "node_args" | "interpreter_args" | "interpreter"
                | "instances" | "env" => true,
                _ if k.starts_with("env_") => env.is_some_and(|e| k == format!("env_{e}")),
                "cwd" => scalar(v)
                    .map(|c| lines.push(format!("cwd = {}", quote(&c))))
                    .is_some(),
                "exec_mode" => {
                    if scalar(v).is_some_and(|m| m.starts_with("fork")) {
                        notes.push("exec_mode = \"fork\": herd runs every app as a cluster of workers on shared sockets".into());
                    }
                    true
                }
                "max_memory_restart" => scalar(v)
                    .filter(|s| crate::spec::parse_size(s).is_ok())
                    .map(|s| lines.push(format!("max_memory = {}", quote(&s))))
                    .is_some(),
                "kill_timeout" | "listen_timeout" | "min_uptime" => millis(v)
                    .map(|d| lines.push(format!("{k} = {}", quote(&d))))
                    .is_some(),
                "restart_delay" | "exp_backoff_restart_delay" => match millis(v) {
                    Some(d) => {
                        // herd's restart delay is exponential; PM2's exp_backoff one is its
                        // equivalent and wins over a fixed restart_delay.
                        if k == "exp_backoff_restart_delay" || restart_delay.is_none() {
                            restart_delay = Some(d);
                        }
                        if k == "restart_delay" {
                            notes.push("restart_delay: herd's restart delay grows x1.5 per unstable restart (PM2's is fixed)".into());
                        }
                        true
                    }
                    None => false,
                },
                "max_restarts" => v
                    .as_u64()
                    .map(|n| lines.push(format!("max_restarts = {n}")))
                    .is_some(),
                "wait_ready" => v
                    .as_bool()
                    .map(|b| {
                        if b {
                            lines.push("wait_ready = true".into())
                        }
                    })
                    .is_some(),
                "autorestart" => v
                    .as_bool()
                    .map(|b| {
                        if !b {
                            lines.push("no_autorestart = true".into())
                        }
                    })
                    .is_some(),
                "out_file" | "log_file" | "log" if has("log_file") => scalar(v)
                    .map(|f| lines.push(format!("log_file = {}", quote(&f))))
                    .is_some(),
                "error_file" | "merge_logs" | "combine_logs" if has("log_file") => {
                    if k == "error_file" {
                        notes.push(
                            "error_file: herd writes stdout and stderr to one log_file".into(),
                        );
                    }
                    true
                }
                _ => false,
            };
            if !mapped {
                unmapped.push(format!("{k} = {}", comment(&v.to_string())));
            }
        }
        if let Some(d) = restart_delay {
            lines.push(format!("restart_delay = {}", quote(&d)));
        }
        let _ = writeln!(out, "\n[apps.{}]", key(&name));
        for note in &notes {
            let _ = writeln!(out, "# note: {}", comment(note));
        }
        for line in &lines {
            let _ = writeln!(out, "{line}");
        }
        for u in &unmapped {
            let _ = writeln!(out, "# not mapped (no herd equivalent): {u}");
        }
        let mut vars: Vec<(String, String)> = Vec::new();
        let mut merge = |v: Option<&Value>| {
            for (k, v) in v.and_then(Value::as_object).into_iter().flatten() {
                let value = scalar(v).unwrap_or_else(|| v.to_string());
                vars.retain(|(key, _)| key != k);
                vars.push((k.clone(), value));
            }
        };
        merge(app.get("env"));
        if let Some(e) = env {
            merge(app.get(&format!("env_{e}")));
        }
        if !vars.is_empty() {
            let _ = writeln!(out, "\n[apps.{}.env]", key(&name));
            for (k, v) in vars {
                let _ = writeln!(out, "{} = {}", key(&k), quote(&v));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pm2_apps_map_onto_keys_and_the_rest_is_listed() {
        let apps: Vec<Value> = serde_json::from_str(
            r#"[
            {"name": "api", "script": "server.js", "args": "--port 3000 'a b'", "instances": -1,
             "exec_mode": "cluster", "max_memory_restart": "300M", "kill_timeout": 3000,
             "wait_ready": true, "listen_timeout": 8000, "watch": true, "cron_restart": "0 * * * *",
             "env": {"NODE_ENV": "development", "N": 1}, "env_production": {"NODE_ENV": "production"}},
            {"name": "worker", "script": "worker.py", "interpreter": "python3", "instances": 0,
             "exp_backoff_restart_delay": 100, "restart_delay": 4000, "autorestart": false},
            {"script": "./bin/srv", "interpreter": "none", "node_args": "--x"}
        ]"#,
        )
        .expect("json");
        let text = to_toml(&apps, Some("production"), "ecosystem.config.js", 4);
        assert!(text.contains("[apps.api]\n"), "{text}");
        assert!(
            text.contains("args = [\"--port\", \"3000\", \"a b\"]"),
            "{text}"
        );
        assert!(text.contains("instances = 3\n"), "{text}");
        assert!(text.contains("max_memory = \"300M\""), "{text}");
        assert!(text.contains("kill_timeout = \"3000ms\""), "{text}");
        assert!(text.contains("listen_timeout = \"8000ms\""), "{text}");
        assert!(text.contains("wait_ready = true"), "{text}");
        assert!(
            text.contains("# not mapped (no herd equivalent): watch = true"),
            "{text}"
        );
        assert!(
            text.contains("# not mapped (no herd equivalent): cron_restart"),
            "{text}"
        );
        assert!(
            text.contains("NODE_ENV = \"production\"\n") && text.contains("N = \"1\"\n"),
            "{text}"
        );
        assert!(text.contains("instances = \"max\""), "{text}");
        assert!(text.contains("restart_delay = \"100ms\""), "{text}");
        assert!(text.contains("no_autorestart = true"), "{text}");
        assert!(text.contains("command = [\"./bin/srv\"]"), "{text}");
        assert!(text.contains("[apps.srv]"), "{text}");
        crate::config::parse(&text, "imported.toml").expect("the output loads");
    }
}
