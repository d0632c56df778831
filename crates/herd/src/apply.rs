//! `herd start herd.toml` and `herd apply herd.toml`: the file's apps against the running
//! ones.
//!
//! One supervisor per app stays the model: starting an app of a file is `herd run FILE
//! --app NAME` detached, as `herd start` does for one app ([`commands::start`]). Each
//! supervisor reports the file it came from and the `herd run` argv it runs
//! (`AppStatus.config`, `.args`), so `apply` compares the file with what runs by argv, key
//! by key ([`config::keys::changed_keys`]), and only touches apps that came from this file:
//!
//! | change | action |
//! |---|---|
//! | app new in the file | `start` |
//! | app gone from the file | `stop` |
//! | only `instances` | `scale N→M` |
//! | `listen`, `balance`, `user`, `log_format` | `restart`: stop, then start (drops connections) |
//! | anything else | `reload`: rolling, onto the new spec (control request `reconfigure`) |

use std::path::Path;
use std::time::Duration;

use herd_proto::control::{AppStatus, Request, Response};

use crate::commands;
use crate::config::{self, keys, App, Config};
use crate::control::{Client, ClientError};
use crate::paths::{AppName, Home};
use crate::print::{errln, outln};

/// Keys a rolling reload cannot change (see `supervisor::reconfigure`).
const RESTART_KEYS: &[&str] = &[
    "listen",
    "balance",
    "name",
    "user",
    "group",
    "log_format",
    // The log file is the supervisor's own (opened before it binds), not a worker's.
    "log_file",
    "log_max_size",
    "log_keep",
    "log_compress",
    // --http's listener and settings are the supervisor's too.
    "http",
    "http_token",
    "ready_min",
    "drain_delay",
];

/// A herd.toml and, optionally, the one app of it asked for.
pub struct FileArgs {
    pub file: Config,
    pub app: Option<String>,
}

/// `herd start herd.toml [--app NAME]`: each app as `herd run FILE --app NAME`, detached.
pub fn start_all(home: &Home, args: &FileArgs) -> anyhow::Result<u8> {
    let mut code = 0;
    for app in args
        .file
        .apps
        .iter()
        .filter(|a| args.app.as_ref().is_none_or(|n| *n == a.name))
    {
        code = code.max(start_one(home, &args.file, app)?);
    }
    Ok(code)
}

fn start_one(home: &Home, file: &Config, app: &App) -> anyhow::Result<u8> {
    let name = AppName::new(&app.name).map_err(anyhow::Error::msg)?;
    let mut argv: Vec<std::ffi::OsString> = vec!["run".into()];
    // The supervisor writes (and rotates) its log itself: the app's `log_file`, else
    // HERD_HOME/NAME.log, as for `herd start` without a file.
    let log_path = match &app.run.log_file {
        Some(path) => file.dir().join(path),
        None => {
            let path = home.display(&name.file("log"));
            argv.push("--log-file".into());
            argv.push(path.clone().into_os_string());
            path
        }
    };
    argv.extend([
        file.path.clone().into_os_string(),
        "--app".into(),
        app.name.clone().into(),
    ]);
    commands::start(home, &name, argv, app.run.listen_timeout, &log_path)
}

/// What `apply` does to one app.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Unchanged,
    Start,
    Stop,
    Scale {
        from: String,
        to: String,
    },
    Reload {
        keys: Vec<String>,
        scale: Option<(String, String)>,
    },
    Restart {
        keys: Vec<String>,
    },
    /// An app of that name runs, but not from this file: never touched.
    Foreign(String),
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Unchanged => write!(f, "unchanged"),
            Step::Start => write!(f, "start"),
            Step::Stop => write!(f, "stop (removed from the file)"),
            Step::Scale { from, to } => write!(f, "scale {from}→{to}"),
            Step::Reload { keys, scale } => {
                write!(f, "reload ({} changed)", keys.join(", "))?;
                if let Some((from, to)) = scale {
                    write!(f, ", then scale {from}→{to}")?;
                }
                Ok(())
            }
            Step::Restart { keys } => write!(
                f,
                "restart ({} changed: drops in-flight connections)",
                keys.join(", ")
            ),
            Step::Foreign(from) => write!(
                f,
                "skipped: an app of this name runs from {from}; stop it, or rename the app"
            ),
        }
    }
}

/// The step for one app of the file, given what runs under its name.
fn step_for(app: &App, running: Option<&AppStatus>, file: &Path) -> anyhow::Result<Step> {
    let Some(status) = running else {
        return Ok(Step::Start);
    };
    if status.config.as_deref() != Some(&*file.to_string_lossy()) {
        return Ok(Step::Foreign(match &status.config {
            Some(other) => other.clone(),
            None => "the command line".into(),
        }));
    }
    // Instances are compared with what runs, not with the argv: `herd scale` changes the
    // count without changing the argv.
    let changed: Vec<String> = keys::changed_keys(&status.args, &app.argv)
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot compare with the running app: {}",
                app.name,
                config::clap_message(&e)
            )
        })?
        .into_iter()
        .filter(|k| k != "instances")
        .collect();
    let want = app.run.instances.resolve();
    let scale = (status.desired != want).then(|| (status.desired.to_string(), want.to_string()));
    let restart: Vec<String> = changed
        .iter()
        .filter(|k| RESTART_KEYS.contains(&k.as_str()))
        .cloned()
        .collect();
    Ok(if !restart.is_empty() {
        Step::Restart { keys: restart }
    } else if !changed.is_empty() {
        Step::Reload {
            keys: changed,
            scale,
        }
    } else if let Some((from, to)) = scale {
        Step::Scale { from, to }
    } else {
        Step::Unchanged
    })
}

fn status_of(home: &Home, name: &AppName) -> Result<Option<AppStatus>, ClientError> {
    match Client::connect(home, name)
        .and_then(|mut c| c.request(&Request::Status, Some(Duration::from_secs(10))))
    {
        Ok(Response { status, .. }) => Ok(status),
        Err(ClientError::NotRunning(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `herd apply FILE [--dry-run]`.
pub fn apply(home: &Home, file: &Path, dry_run: bool) -> anyhow::Result<u8> {
    let config = config::load(file)?;
    let mut steps: Vec<(String, Step)> = Vec::new();
    for app in &config.apps {
        let name = AppName::new(&app.name).map_err(anyhow::Error::msg)?;
        let running = status_of(home, &name)?;
        steps.push((
            app.name.clone(),
            step_for(app, running.as_ref(), &config.path)?,
        ));
    }
    for name in home.apps() {
        if config.apps.iter().any(|a| a.name == name.as_str()) {
            continue;
        }
        if let Ok(Some(status)) = status_of(home, &name) {
            if status.config.as_deref() == Some(&*config.path.to_string_lossy()) {
                steps.push((name.as_str().to_string(), Step::Stop));
            }
        }
    }
    for (name, step) in &steps {
        outln!("{name}: {step}")?;
    }
    if dry_run {
        return Ok(0);
    }
    let mut code = 0;
    for (name, step) in &steps {
        let app_name = AppName::new(name).map_err(anyhow::Error::msg)?;
        let app = config.apps.iter().find(|a| a.name == *name);
        let result = match (step, app) {
            (Step::Unchanged, _) => Ok(0),
            (Step::Foreign(_), _) => Ok(commands::FAILED),
            (Step::Start, Some(app)) => start_one(home, &config, app),
            (Step::Stop, _) => commands::stop(home, &app_name),
            (Step::Scale { .. }, Some(app)) => scale(home, &app_name, app),
            (Step::Reload { scale: again, .. }, Some(app)) => {
                let request = Request::Reconfigure {
                    parallel: 1,
                    args: app.argv.clone(),
                };
                match commands::outcome(home, &app_name, request) {
                    Ok(0) if again.is_some() => scale(home, &app_name, app),
                    other => other,
                }
            }
            (Step::Restart { .. }, Some(app)) => match commands::stop(home, &app_name) {
                Ok(0) => start_one(home, &config, app),
                other => other,
            },
            (_, None) => Ok(commands::FAILED),
        };
        match result {
            Ok(c) => code = code.max(c),
            Err(e) => {
                errln!("error: {name}: {e:#}");
                code = commands::FAILED;
            }
        }
    }
    Ok(code)
}

fn scale(home: &Home, name: &AppName, app: &App) -> anyhow::Result<u8> {
    let to = app.run.instances.resolve().to_string();
    commands::outcome(home, name, Request::Scale { to })
}
