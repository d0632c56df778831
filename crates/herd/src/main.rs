//! herd: run any server program as N workers on one shared port.
//!
//! `main` parses the command line into a [`spec::Spec`], resolves it into a [`plan::Plan`]
//! (program found, sockets bound) and hands that to the [`supervisor`] on a single-threaded
//! tokio runtime. Every error a user can cause ends here as one `error: …` line and a
//! non-zero exit.

mod apply;
mod balance;
mod cli;
mod commands;
mod config;
mod control;
mod cpus;
mod fmt;
mod health;
mod http;
mod import;
mod inherit;
mod logs;
mod mix;
mod monit;
mod node;
mod os;
mod paths;
mod plan;
mod print;
mod procfs;
mod reaper;
mod reuseport;
mod rundir;
mod sdnotify;
mod spawn;
mod spec;
mod startup;
mod supervisor;
mod vocab;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::supervisor::Supervisor;
use crate::vocab::SignalKind;

fn main() -> ExitCode {
    // herd re-executes itself to bind a worker's unix socket with the worker's rights.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == node::sockfile::HELPER_ARG)
    {
        return node::sockfile::helper_main();
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    match dispatch(cli.command) {
        Ok(code) => ExitCode::from(code),
        // The reader of our output went away (`herd ls | head -1`): nothing left to say.
        Err(e)
            if e.downcast_ref::<print::StdoutError>()
                .is_some_and(print::StdoutError::is_closed) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            print::errln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<u8> {
    if let Command::Run(args) = command {
        if config::is_config(&args.app) {
            return run_config(args);
        }
        return run(args, None, command_line_args());
    }
    if let Command::Import { file, env } = &command {
        return import::import(file, env.as_deref());
    }
    if let Command::Startup {
        manager: cli::StartupManager::Systemd(args),
    } = &command
    {
        return startup::systemd(args);
    }
    let home = paths::herd_home().map_err(anyhow::Error::msg)?;
    let home = paths::Home::open(&home)?;
    match command {
        Command::Run(_) | Command::Startup { .. } => unreachable!("handled above"),
        Command::Start(args) if config::is_config(&args.app) => {
            apply::start_all(&home, &config_args(args)?)
        }
        Command::Start(args) => {
            let listen_timeout = args.listen_timeout;
            let name = match args.name.clone() {
                Some(name) => name,
                None => paths::AppName::new(&args.clone().into_spec().name)
                    .map_err(anyhow::Error::msg)?,
            };
            // The supervisor writes (and rotates) its log itself: HERD_HOME/NAME.log
            // unless --log-file says otherwise.
            let (log_path, add_log_file) = match &args.log_file {
                Some(path) => (
                    std::path::absolute(path).unwrap_or_else(|_| path.clone()),
                    None,
                ),
                None => {
                    let path = home.display(&name.file("log"));
                    (path.clone(), Some(path))
                }
            };
            commands::start(
                &home,
                &name,
                start_args(args.name.is_none(), name.as_str(), add_log_file),
                listen_timeout,
                &log_path,
            )
        }
        Command::Ls { json, watch } => match watch {
            Some(every) => commands::watch_ls(&home, every),
            None => commands::ls(&home, json),
        },
        Command::Status { name, json, watch } => match watch {
            Some(every) => commands::watch_status(&home, &name, every),
            None => commands::status(&home, &name, json),
        },
        Command::Reload { name, parallel } => commands::outcome(
            &home,
            &name,
            herd_proto::control::Request::Reload { parallel },
        ),
        Command::Restart { name, instance } => commands::outcome(
            &home,
            &name,
            match instance {
                Some(instance) => herd_proto::control::Request::RestartWorker { instance },
                None => herd_proto::control::Request::Restart,
            },
        ),
        Command::Scale { name, to } => {
            commands::outcome(&home, &name, herd_proto::control::Request::Scale { to })
        }
        Command::Stop { name } => commands::stop(&home, &name),
        Command::Logs {
            name,
            lines,
            follow,
            instance,
        } => commands::logs(&home, &name, lines, follow, instance),
        Command::Send {
            name,
            json,
            instance,
        } => commands::send(&home, &name, &json, instance),
        Command::Apply { file, dry_run } => apply::apply(&home, &file, dry_run),
        Command::Import { .. } => unreachable!("handled above"),
        Command::Monit => monit::run(home),
    }
}

/// `herd run ARGS`: ARGS as given, for `herd status --json` (`args`).
fn command_line_args() -> Vec<String> {
    std::env::args()
        .skip_while(|a| a != "run")
        .skip(1)
        .collect()
}

/// `herd run|start herd.toml [--app NAME]`: the file and the app asked for. Other options
/// belong in the file and are refused here, so that what runs is what the file says.
fn config_args(args: cli::RunArgs) -> anyhow::Result<apply::FileArgs> {
    let mut app = args.config_app.map(paths::AppName::into_string);
    let mut rest = args.args.as_slice();
    // `herd run herd.toml --app web`: after APP, clap hands everything to ARGS.
    if let [flag, name, tail @ ..] = rest {
        if flag == "--app" && app.is_none() {
            app = Some(name.clone());
            rest = tail;
        }
    }
    if let Some(flag) = rest.first() {
        anyhow::bail!("unexpected `{flag}` after {}: with a herd.toml, options go in the file; only --app NAME may follow it", args.app);
    }
    let matches = <Cli as clap::CommandFactory>::command()
        .try_get_matches_from(std::env::args_os())
        .map_err(|e| anyhow::anyhow!("{}", config::clap_message(&e)))?;
    if let Some((_, sub)) = matches.subcommand() {
        for arg in config::keys::run_command().get_arguments() {
            let id = arg.get_id().as_str();
            // `log_file`: `herd start FILE` names HERD_HOME/NAME.log for an app whose table
            // has none (see apply::start_one).
            if matches!(id, "config_app" | "app" | "args" | "log_file") {
                continue;
            }
            if sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
                let long = arg.get_long().unwrap_or(id);
                anyhow::bail!(
                    "--{long} given with {}: with a herd.toml, options go in the file (key `{}` of the app's table)",
                    args.app,
                    long.replace('-', "_")
                );
            }
        }
    }
    let file = config::load(std::path::Path::new(&args.app))?;
    if let Some(name) = &app {
        file.app(name)?;
    }
    Ok(apply::FileArgs { file, app })
}

/// `herd run herd.toml [--app NAME]`: one app of the file in the foreground, in the file's
/// directory (relative paths in the file are relative to it).
fn run_config(args: cli::RunArgs) -> anyhow::Result<u8> {
    let log_file = args.log_file.clone();
    let apply::FileArgs { file, app } = config_args(args)?;
    let mut app = match app {
        Some(name) => file.app(&name)?.clone(),
        None => match file.apps.as_slice() {
            [only] => only.clone(),
            apps => {
                let names: Vec<&str> = apps.iter().map(|a| a.name.as_str()).collect();
                anyhow::bail!(
                    "{} has {} apps ({}): pick one with --app NAME",
                    file.path.display(),
                    apps.len(),
                    names.join(", ")
                );
            }
        },
    };
    if app.run.log_file.is_none() {
        app.run.log_file = log_file.map(|p| std::path::absolute(&p).unwrap_or(p));
    }
    // HERD_HOME is found before the directory changes, so a relative one still works.
    let home = paths::herd_home().map_err(anyhow::Error::msg)?;
    let home = std::path::absolute(&home)?;
    std::env::set_current_dir(file.dir())
        .map_err(|e| anyhow::anyhow!("cannot enter {}: {e}", file.dir().display()))?;
    std::env::set_var("HERD_HOME", &home);
    run(
        app.run,
        Some(file.path.to_string_lossy().into_owned()),
        app.argv,
    )
}

/// `herd start ARGS` runs `herd run ARGS` detached, with the name made explicit.
fn start_args(
    add_name: bool,
    name: &str,
    log_file: Option<std::path::PathBuf>,
) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "start") {
        args[i] = "run".into();
        if let Some(path) = log_file {
            args.insert(i + 1, "--log-file".into());
            args.insert(i + 2, path.into());
        }
        if add_name {
            args.insert(i + 1, "--name".into());
            args.insert(i + 2, name.into());
        }
    }
    args
}

/// Help and version go to stdout with exit 0; a usage error is one line (the clap message
/// names the flag and what it accepts) and exit 2.
fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    print::errln!("{}", one_line(e.kind(), &e.to_string()));
    ExitCode::from(2)
}

/// clap's error as one line: its first line, with what it lists below (the missing
/// arguments) and, for a missing argument, the usage.
fn one_line(kind: clap::error::ErrorKind, text: &str) -> String {
    let mut lines = text.lines();
    let mut line = lines
        .next()
        .unwrap_or("error: invalid command line")
        .trim_end()
        .to_string();
    if line.ends_with(':') {
        let listed: Vec<&str> = lines
            .take_while(|l| !l.trim().is_empty())
            .map(str::trim)
            .collect();
        if !listed.is_empty() {
            line = format!("{line} {}", listed.join(" "));
        }
    }
    if kind == clap::error::ErrorKind::MissingRequiredArgument {
        if let Some(usage) = text.lines().find_map(|l| l.trim().strip_prefix("Usage: ")) {
            line = format!("{line} (usage: {usage}; see --help)");
        }
    }
    line
}

fn run(args: cli::RunArgs, config: Option<String>, argv: Vec<String>) -> anyhow::Result<u8> {
    // First, while herd has one thread: it also clears LISTEN_* from herd's environment.
    let inherited = inherit::take().map_err(anyhow::Error::msg)?;
    // Orphaned descendants of workers (`npm start` → sh → node) come to herd to be reaped,
    // not to PID 1 of the host (or nobody, when herd is PID 1 in a container).
    if let Err(e) = reaper::become_subreaper() {
        print::errln!(
            "warning: herd cannot become a child subreaper ({e}); orphans of workers go to PID 1"
        );
    }
    let drain_delay = args.drain_delay;
    let env_token = std::env::var("HERD_HTTP_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    // Workers inherit herd's environment, and they must not learn the token. No other
    // thread runs yet (herd's output thread starts below), so this is sound.
    std::env::remove_var("HERD_HTTP_TOKEN");
    // Opened first: a path herd may not write is an error before anything is bound.
    let log_file = match &args.log_file {
        Some(path) => Some(
            logs::file::LogFile::open(logs::file::LogFileSpec {
                path: std::path::absolute(path).unwrap_or_else(|_| path.clone()),
                max_size: args.log_max_size,
                keep: args.log_keep,
                compress: args.log_compress,
            })
            .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    // --http: checked and bound before anything else is touched (a refused address or a
    // busy port fails the start with nothing left behind).
    let http = match args.http {
        Some(addr) => {
            let token = args.http_token.clone().or(env_token);
            let config = http::Config::new(addr, token, args.ready_min)?;
            let listener = config.bind()?;
            Some((config, listener))
        }
        None => None,
    };
    let spec = args.into_spec();
    let log_format = spec.log_format;
    let name = spec.name.clone();
    // Checked before any file is touched (clap has checked --name; this is the default).
    let app = paths::AppName::new(&name).map_err(anyhow::Error::msg)?;
    let home = paths::herd_home().map_err(anyhow::Error::msg)?;
    // Held open for the whole run: the control socket is used through this descriptor.
    let home_dir = paths::Home::open(&home)?;
    // Notify sockets live here (see rundir.rs). Workers run as another user (`--user`)
    // cannot enter the private HERD_HOME, so theirs is in the temp directory.
    let run_parent = match spec.user {
        Some(_) => std::env::temp_dir(),
        None => home.clone(),
    };
    let run_dir = rundir::create(&run_parent).map_err(anyhow::Error::msg)?;
    // The name's lock is held (`_lock`) until this function returns, after the supervisor.
    let control::Registration {
        listener: control,
        lock: _lock,
        socket: control_path,
    } = match control::register(&home_dir, &app) {
        Ok(registration) => registration,
        Err(e) => {
            let _ = std::fs::remove_dir(&run_dir);
            return Err(e);
        }
    };
    // Where `herd logs` finds this app's file once the supervisor is gone.
    record_log_path(&home_dir, &app, log_file.as_ref().map(|f| f.path()));
    let plan = match plan::plan(spec, inherited) {
        Ok(plan) => plan,
        Err(e) => {
            let _ = std::fs::remove_dir(&run_dir);
            let _ = home_dir.unlink(&app.file("sock"));
            return Err(e.into());
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let sink = match log_file {
        Some(file) => logs::out::Sink::File(file),
        None => logs::out::Sink::Stdout,
    };
    let logger = logs::Logger::new(&name, log_format, sink)
        .map_err(|e| anyhow::anyhow!("cannot start the thread that writes herd's output: {e}"))?;
    let output = logger.output();
    let code = local.block_on(&runtime, async move {
        let (mut sup, rx) = Supervisor::new(plan, logger, run_dir);
        sup.set_control_path(control_path.clone());
        sup.set_origin(config, argv);
        sup.observe_with(http.is_some(), drain_delay);
        let tx = sup.sender();
        forward_signals(tx.clone())?;
        reopen_on_sigusr1(sup.logger().output())?;
        reaper::watch()?;
        sdnotify::watchdog();
        let http = http.map(|(config, listener)| {
            let tap = http::event_tap();
            let logger = sup.logger();
            logger.set_tap(tap.clone());
            let addr = listener.local_addr().map_or(config.addr, |a| a);
            logger.event(
                herd_proto::event::EventName::Http,
                None,
                &format!("serving metrics, status and the dashboard on http://{addr}/"),
                &[("address", serde_json::json!(addr.to_string()))],
            );
            tokio::task::spawn_local(http::serve(listener, config, tx.clone(), tap))
        });
        let control = tokio::net::UnixListener::from_std(control)?;
        let serving = tokio::task::spawn_local(control::serve(control, tx, sup.logger()));
        let code = sup.run(rx).await;
        serving.abort();
        if let Some(http) = http {
            http.abort();
        }
        anyhow::Ok(code)
    });
    // Whatever stdout has not taken within the bound is lost: a blocked stdout must not keep
    // herd running after its workers are gone.
    output.finish(logs::out::EXIT_FLUSH);
    reaper::reap_orphans();
    // The supervisor removed its control socket before answering `herd stop`, under the
    // name's lock; a new supervisor of the name waits for the lock.
    let code = code?;
    Ok(u8::try_from(code).unwrap_or(1))
}

/// Turns SIGTERM and SIGINT into supervisor events.
fn forward_signals(tx: tokio::sync::mpsc::UnboundedSender<vocab::Event>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind as Kind};
    let signals = [
        (Kind::terminate(), SignalKind::Terminate),
        (Kind::interrupt(), SignalKind::Interrupt),
        (Kind::hangup(), SignalKind::Hangup),
        (Kind::from_raw(libc::SIGTTIN), SignalKind::MoreWorkers),
        (Kind::from_raw(libc::SIGTTOU), SignalKind::FewerWorkers),
    ];
    for (kind, ours) in signals {
        let mut stream = signal(kind)?;
        let tx = tx.clone();
        tokio::task::spawn_local(async move {
            while stream.recv().await.is_some() {
                if tx.send(vocab::Event::Signal(ours)).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

/// SIGUSR1 opens the log file again by its name (after logrotate renamed it). The writer
/// thread does it; this task only asks. Without `--log-file` the signal does nothing.
fn reopen_on_sigusr1(output: logs::out::Output) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind as Kind};
    let mut stream = signal(Kind::user_defined1())?;
    tokio::task::spawn_local(async move {
        while stream.recv().await.is_some() {
            output.reopen();
        }
    });
    Ok(())
}

/// Writes the log file's path to `HERD_HOME/NAME.logpath` (or removes a stale one), so
/// `herd logs NAME` can read the file after the supervisor is gone. Best effort: without
/// it `herd logs` reads `HERD_HOME/NAME.log`.
fn record_log_path(home: &paths::Home, app: &paths::AppName, path: Option<&std::path::Path>) {
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    let file = app.file("logpath");
    let Some(path) = path else {
        let _ = home.unlink(&file);
        return;
    };
    if let Ok(mut f) = home.open_private_file(
        &file,
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::TRUNC,
    ) {
        let _ = f.write_all(path.as_os_str().as_bytes());
    }
}
