//! `herd.toml`: several apps in one file, each table the options of one `herd run`.
//!
//! ```toml
//! [apps.web]
//! script = "server.js"
//! instances = 4
//! listen = ["127.0.0.1:3000"]
//! [apps.web.env]
//! NODE_ENV = "production"
//! ```
//!
//! The file is parsed with spans kept (toml's `DeTable`), and each app table is turned into
//! the argv of `herd run` ([`keys`]: every long flag is a key), which clap then parses as it
//! parses the command line — so a flag added to `herd run` is a key at once, and a value is
//! checked by the same code either way. Every error points into the file:
//! `herd.toml:4:13: instances: must be at least 1 (…)`, `unknown key "instaces" at
//! herd.toml:4:1 — did you mean "instances"?`.
//!
//! Relative paths are relative to the file's directory: `herd run herd.toml` runs in it.

pub mod keys;

use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};
use toml::Spanned;

pub use keys::{clap_message, parse_run};

use crate::cli::RunArgs;
use crate::paths::AppName;

/// The most a herd.toml may hold (it is read whole).
const MAX_FILE: u64 = 4 << 20;

/// A problem with a herd.toml, where it is.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    message: String,
}

/// A loaded herd.toml.
#[derive(Debug)]
pub struct Config {
    /// Absolute.
    pub path: PathBuf,
    pub apps: Vec<App>,
}

#[derive(Debug, Clone)]
pub struct App {
    pub name: String,
    /// `herd run` argv (after `run`), in a canonical order: the same file gives the same argv.
    pub argv: Vec<String>,
    pub run: RunArgs,
}

impl Config {
    /// The file's directory, where its apps run.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("/"))
    }

    pub fn app(&self, name: &str) -> Result<&App, ConfigError> {
        self.apps.iter().find(|a| a.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.apps.iter().map(|a| a.name.as_str()).collect();
            ConfigError {
                message: format!(
                    "{} has no app named `{name}` (it has: {})",
                    self.path.display(),
                    names.join(", ")
                ),
            }
        })
    }
}

/// Whether APP names a herd.toml rather than a program.
pub fn is_config(app: &str) -> bool {
    app.ends_with(".toml")
}

/// Reads and checks `path`: every app's options parse.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let shown = path.display().to_string();
    let fail = |message: String| ConfigError { message };
    let abs = std::path::absolute(path).map_err(|e| fail(format!("{shown}: {e}")))?;
    let file = std::fs::File::open(&abs).map_err(|e| fail(format!("cannot read {shown}: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| fail(format!("cannot read {shown}: {e}")))?;
    if !meta.is_file() {
        return Err(fail(format!("{shown} is not a file")));
    }
    if meta.len() > MAX_FILE {
        return Err(fail(format!(
            "{shown} is {} bytes; a herd.toml may have at most {MAX_FILE}",
            meta.len()
        )));
    }
    let mut text = String::new();
    use std::io::Read;
    file.take(MAX_FILE)
        .read_to_string(&mut text)
        .map_err(|e| fail(format!("cannot read {shown}: {e}")))?;
    let apps = parse(&text, &shown)?;
    Ok(Config { path: abs, apps })
}

/// Parses a herd.toml's text; `shown` names it in errors.
pub fn parse(text: &str, shown: &str) -> Result<Vec<App>, ConfigError> {
    let at = |span: Range<usize>| position(text, shown, span.start);
    let doc = DeTable::parse(text).map_err(|e| {
        let pos = e.span().map(&at).unwrap_or_else(|| shown.to_string());
        ConfigError {
            message: format!("{pos}: {}", e.message().trim_end()),
        }
    })?;
    let mut apps_table = None;
    for (key, value) in doc.get_ref().iter() {
        match key.get_ref().as_ref() {
            "apps" => apps_table = Some(value),
            other => {
                return Err(unknown(other, at(key.span()), ["apps"]));
            }
        }
    }
    let Some(apps_value) = apps_table else {
        return Err(ConfigError {
            message: format!("{shown}: no apps; add one like [apps.web] with command = [\"python3\", \"server.py\"]"),
        });
    };
    let DeValue::Table(apps_table) = apps_value.get_ref() else {
        return Err(ConfigError {
            message: format!(
                "{}: apps must be a table of apps, like [apps.web]",
                at(apps_value.span())
            ),
        });
    };
    let mut apps = Vec::new();
    for (name, table) in apps_table.iter() {
        let name_str = name.get_ref().as_ref();
        if let Err(e) = AppName::new(name_str) {
            return Err(ConfigError {
                message: format!("{}: app name `{name_str}`: {e}", at(name.span())),
            });
        }
        let DeValue::Table(table) = table.get_ref() else {
            return Err(ConfigError {
                message: format!(
                    "{}: apps.{name_str} must be a table of options, like [apps.{name_str}]",
                    at(table.span())
                ),
            });
        };
        apps.push(app(name_str, table, text, shown)?);
    }
    if apps.is_empty() {
        return Err(ConfigError {
            message: format!("{shown}: no apps; add one like [apps.web] with command = [\"python3\", \"server.py\"]"),
        });
    }
    Ok(apps)
}

fn unknown<'a>(key: &str, pos: String, known: impl IntoIterator<Item = &'a str>) -> ConfigError {
    let hint = match keys::nearest(key, known) {
        Some(near) => format!(" — did you mean \"{near}\"?"),
        None => " — see docs/config.md for the keys".to_string(),
    };
    ConfigError {
        message: format!("unknown key \"{key}\" at {pos}{hint}"),
    }
}

/// `file:line:column` of a byte offset (both 1-based, columns in characters).
fn position(text: &str, shown: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("{shown}:{line}:{column}")
}

/// Where each piece of the argv came from, for errors.
struct Origin {
    key: String,
    key_span: Range<usize>,
    /// Each value with its span.
    values: Vec<(String, Range<usize>)>,
}

/// One app table → `herd run` argv → [`RunArgs`].
fn app(name: &str, table: &DeTable<'_>, text: &str, shown: &str) -> Result<App, ConfigError> {
    let at = |span: Range<usize>| position(text, shown, span.start);
    let flags = keys::flag_keys();
    let all = keys::all_keys(&flags);
    let known = || all.iter().map(String::as_str);
    let bad = |span: Range<usize>, key: &str, problem: String| ConfigError {
        message: format!("{}: {key}: {problem}", at(span)),
    };
    for (key, _) in table.iter() {
        let k = key.get_ref().as_ref();
        if k == "name" {
            return Err(bad(
                key.span(),
                k,
                format!("an app's name is its table's name ([apps.{name}]); remove this key"),
            ));
        }
        if !all.iter().any(|a| a == k) {
            return Err(unknown(k, at(key.span()), known()));
        }
    }
    let get = |k: &str| table.iter().find(|(key, _)| key.get_ref().as_ref() == k);
    let mut argv: Vec<String> = Vec::new();
    let mut origins: Vec<Origin> = Vec::new();
    for flag in &flags {
        let Some((key, value)) = get(&flag.key) else {
            continue;
        };
        let mut origin = Origin {
            key: flag.key.clone(),
            key_span: key.span(),
            values: Vec::new(),
        };
        if flag.flag {
            match value.get_ref() {
                DeValue::Boolean(true) => argv.push(format!("--{}", flag.long)),
                DeValue::Boolean(false) => {}
                other => {
                    return Err(bad(
                        value.span(),
                        &flag.key,
                        format!("expected true or false, found {}", other.type_str()),
                    ))
                }
            }
            origins.push(origin);
            continue;
        }
        let values: Vec<(String, Range<usize>)> = match value.get_ref() {
            // `[apps.web.env]`: KEY = "value", one --env each.
            DeValue::Table(env) if flag.key == "env" => {
                let mut pairs = Vec::new();
                for (k, v) in env.iter() {
                    let text = scalar(v.get_ref()).ok_or_else(|| {
                        bad(
                            v.span(),
                            &format!("env.{}", k.get_ref()),
                            format!(
                                "expected a string or number, found {}",
                                v.get_ref().type_str()
                            ),
                        )
                    })?;
                    pairs.push((format!("{}={text}", k.get_ref()), v.span()));
                }
                pairs
            }
            DeValue::Array(items) if flag.repeats => {
                let mut list = Vec::new();
                for item in items.iter() {
                    let text = scalar(item.get_ref()).ok_or_else(|| {
                        bad(
                            item.span(),
                            &flag.key,
                            format!(
                                "expected an array of strings, found {} in it",
                                item.get_ref().type_str()
                            ),
                        )
                    })?;
                    list.push((text, item.span()));
                }
                list
            }
            other => match scalar(other) {
                Some(text) => vec![(text, value.span())],
                None => {
                    let expected = if flag.key == "env" {
                        "a table like [apps.NAME.env] or an array of \"KEY=VALUE\""
                    } else if flag.repeats {
                        "a string or an array of strings"
                    } else {
                        "a string or a number"
                    };
                    return Err(bad(
                        value.span(),
                        &flag.key,
                        format!("expected {expected}, found {}", other.type_str()),
                    ));
                }
            },
        };
        for (text, span) in values {
            // `--flag=value`: a value starting with `-` stays a value.
            argv.push(format!("--{}={text}", flag.long));
            origin.values.push((text, span));
        }
        origins.push(origin);
    }
    argv.push(format!("--name={name}"));
    argv.push("--".into());
    argv.extend(program(name, table, text, shown)?);
    let run = parse_run(&argv).map_err(|e| clap_error(&e, &origins, text, shown, name))?;
    Ok(App {
        name: name.to_string(),
        argv,
        run,
    })
}

/// The program and its arguments: `command = [...]`, or `script` and `args`.
fn program(
    name: &str,
    table: &DeTable<'_>,
    text: &str,
    shown: &str,
) -> Result<Vec<String>, ConfigError> {
    let at = |span: Range<usize>| position(text, shown, span.start);
    let get = |k: &str| table.iter().find(|(key, _)| key.get_ref().as_ref() == k);
    let strings = |key: &str, v: &Spanned<DeValue<'_>>| -> Result<Vec<String>, ConfigError> {
        let DeValue::Array(items) = v.get_ref() else {
            return Err(ConfigError {
                message: format!(
                    "{}: {key}: expected an array of strings like [\"python3\", \"server.py\"], found {}",
                    at(v.span()),
                    v.get_ref().type_str()
                ),
            });
        };
        items
            .iter()
            .map(|item| {
                scalar(item.get_ref()).ok_or_else(|| ConfigError {
                    message: format!(
                        "{}: {key}: expected strings, found {}",
                        at(item.span()),
                        item.get_ref().type_str()
                    ),
                })
            })
            .collect()
    };
    match (get("command"), get("script")) {
        (Some((key, _)), Some(_)) => Err(ConfigError {
            message: format!(
                "{}: apps.{name}: both command and script; use one (command = [program, args…], or script with args)",
                at(key.span())
            ),
        }),
        (Some((key, command)), None) => {
            if let Some((args, _)) = get("args") {
                return Err(ConfigError {
                    message: format!(
                        "{}: args: goes with script; with command, put the arguments in command",
                        at(args.span())
                    ),
                });
            }
            let command = strings("command", command)?;
            if command.first().is_none_or(|p| p.is_empty()) {
                return Err(ConfigError {
                    message: format!(
                        "{}: command: empty; give the program and its arguments, like [\"python3\", \"server.py\"]",
                        at(key.span())
                    ),
                });
            }
            Ok(command)
        }
        (None, Some((_, script))) => {
            let Some(script_text) = script.get_ref().as_str().filter(|s| !s.is_empty()) else {
                return Err(ConfigError {
                    message: format!(
                        "{}: script: expected a file name like \"app.js\"",
                        at(script.span())
                    ),
                });
            };
            let mut argv = vec![script_text.to_string()];
            if let Some((_, args)) = get("args") {
                argv.extend(strings("args", args)?);
            }
            Ok(argv)
        }
        (None, None) => Err(ConfigError {
            message: format!(
                "{shown}: apps.{name}: no program; add command = [\"python3\", \"server.py\"] or script = \"app.js\""
            ),
        }),
    }
}

/// A string, number or boolean as the text of a flag's value.
fn scalar(value: &DeValue<'_>) -> Option<String> {
    match value {
        DeValue::String(s) => Some(s.to_string()),
        DeValue::Integer(i) => Some(i.as_str().to_string()),
        DeValue::Float(f) => Some(f.as_str().to_string()),
        DeValue::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A clap error on the generated argv, pointed at the key or value it came from.
fn clap_error(
    e: &clap::Error,
    origins: &[Origin],
    text: &str,
    shown: &str,
    name: &str,
) -> ConfigError {
    use clap::error::ContextKind;
    let arg = e
        .get(ContextKind::InvalidArg)
        .map(|a| a.to_string())
        .unwrap_or_default();
    let value = e.get(ContextKind::InvalidValue).map(|v| v.to_string());
    let problem = clap_message(e);
    // `--instances <N|max>` → the key `instances`.
    let long = arg
        .strip_prefix("--")
        .map(|a| a.split([' ', '=']).next().unwrap_or(a).to_string());
    let origin = long.and_then(|l| {
        let key = l.replace('-', "_");
        origins.iter().find(|o| o.key == key)
    });
    match origin {
        Some(o) => {
            let span = value
                .and_then(|v| o.values.iter().find(|(t, _)| *t == v))
                .or(o.values.first())
                .map(|(_, s)| s.clone())
                .unwrap_or_else(|| o.key_span.clone());
            ConfigError {
                message: format!(
                    "{}: {}: {problem}",
                    position(text, shown, span.start),
                    o.key
                ),
            }
        }
        None => ConfigError {
            message: format!("{shown}: apps.{name}: {problem}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(text, "herd.toml").expect_err("an error").to_string()
    }

    #[test]
    fn apps_become_run_argvs() {
        let apps = parse(
            r#"
[apps.web]
script = "server.js"
args = ["--port", "-1"]
instances = "max"
listen = ["127.0.0.1:3000", "127.0.0.1:3001"]
no_autorestart = true
kill_timeout = "2s"
[apps.web.env]
NODE_ENV = "production"
PORT_OFFSET = 2

[apps.api]
command = ["python3", "api.py"]
instances = 2
"#,
            "herd.toml",
        )
        .expect("parses");
        let web = apps.iter().find(|a| a.name == "web").expect("web");
        assert_eq!(
            web.argv,
            [
                "--instances=max",
                "--listen=127.0.0.1:3000",
                "--listen=127.0.0.1:3001",
                "--env=NODE_ENV=production",
                "--env=PORT_OFFSET=2",
                "--kill-timeout=2s",
                "--no-autorestart",
                "--name=web",
                "--",
                "server.js",
                "--port",
                "-1"
            ]
        );
        let api = apps.iter().find(|a| a.name == "api").expect("api");
        let spec = api.run.clone().into_spec();
        assert_eq!(spec.program, "python3");
        assert_eq!(spec.args, ["api.py"]);
        assert_eq!(spec.name, "api");
    }

    #[test]
    fn errors_point_into_the_file() {
        let e = err("[apps.web]\ncommand = [\"x\"]\ninstaces = 4\n");
        assert_eq!(
            e,
            "unknown key \"instaces\" at herd.toml:3:1 — did you mean \"instances\"?"
        );
        let e = err("[apps.web]\ncommand = [\"x\"]\n\ninstances =   0\n");
        assert!(
            e.starts_with("herd.toml:4:15: instances: must be at least 1"),
            "{e}"
        );
        let e = err("[apps.web]\ncommand = [\"x\"]\nlisten = [\"127.0.0.1:1\", \"nope:x\"]\n");
        assert!(e.starts_with("herd.toml:3:26: listen: "), "{e}");
        let e = err("[apps.web]\ncommand = [\"x\"]\nkill_timeout = { a = 1 }\n");
        assert!(
            e.starts_with("herd.toml:3:16: kill_timeout: expected a string or a number, found"),
            "{e}"
        );
        let e = err("[apps.web]\ncommand = [\"x\"]\nno_autorestart = \"yes\"\n");
        assert!(
            e.starts_with("herd.toml:3:18: no_autorestart: expected true or false"),
            "{e}"
        );
        let e = err("verison = 1\n[apps.web]\ncommand = [\"x\"]\n");
        assert!(
            e.starts_with("unknown key \"verison\" at herd.toml:1:1"),
            "{e}"
        );
        let e = err("[apps.web]\ninstances = 2\n");
        assert!(e.contains("no program"), "{e}");
        let e = err("[apps.web]\ncommand = \"python3 x.py\"\n");
        assert!(
            e.starts_with("herd.toml:2:11: command: expected an array"),
            "{e}"
        );
        let e = err("[apps.web\ncommand = 1\n");
        assert!(e.starts_with("herd.toml:1:"), "{e}");
        let e = err("[apps.\"../x\"]\ncommand = [\"x\"]\n");
        assert!(e.starts_with("herd.toml:1:7: app name"), "{e}");
    }
}
