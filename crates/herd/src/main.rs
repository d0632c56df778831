//! herd: run any server program as N workers on one shared port.
//!
//! `main` parses the command line into a [`spec::Spec`], resolves it into a [`plan::Plan`]
//! (program found, sockets bound) and hands that to the [`supervisor`] on a single-threaded
//! tokio runtime. Every error a user can cause ends here as one `error: …` line and a
//! non-zero exit.

mod balance;
mod cli;
mod commands;
mod control;
mod fmt;
mod health;
mod http;
mod logs;
mod mix;
mod node;
mod os;
mod paths;
mod plan;
mod print;
mod procfs;
mod reuseport;
mod rundir;
mod sdnotify;
mod spawn;
mod spec;
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
        return run(args);
    }
    let home = paths::herd_home().map_err(anyhow::Error::msg)?;
    let home = paths::Home::open(&home)?;
    match command {
        Command::Run(_) => unreachable!("handled above"),
        Command::Start(args) => {
            let listen_timeout = args.listen_timeout;
            let name = match args.name.clone() {
                Some(name) => name,
                None => paths::AppName::new(&args.clone().into_spec().name)
                    .map_err(anyhow::Error::msg)?,
            };
            commands::start(
                &home,
                &name,
                start_args(args.name.is_none(), name.as_str()),
                listen_timeout,
            )
        }
        Command::Ls { json } => commands::ls(&home, json),
        Command::Status { name, json } => commands::status(&home, &name, json),
        Command::Reload { name, parallel } => commands::outcome(
            &home,
            &name,
            herd_proto::control::Request::Reload { parallel },
        ),
        Command::Restart { name } => {
            commands::outcome(&home, &name, herd_proto::control::Request::Restart)
        }
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
    }
}

/// `herd start ARGS` runs `herd run ARGS` detached, with the name made explicit.
fn start_args(add_name: bool, name: &str) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "start") {
        args[i] = "run".into();
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

fn run(args: cli::RunArgs) -> anyhow::Result<u8> {
    // --http: checked and bound before anything else is touched (a refused address or a
    // busy port fails the start with nothing left behind).
    let drain_delay = args.drain_delay;
    let env_token = std::env::var("HERD_HTTP_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    // Workers inherit herd's environment, and they must not learn the token. No other
    // thread runs yet (herd's output thread starts below), so this is sound.
    std::env::remove_var("HERD_HTTP_TOKEN");
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
    let plan = match plan::plan(spec) {
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
    let logger = logs::Logger::new(&name, log_format)
        .map_err(|e| anyhow::anyhow!("cannot start the thread that writes herd's output: {e}"))?;
    let output = logger.output();
    let code = local.block_on(&runtime, async move {
        let (mut sup, rx) = Supervisor::new(plan, logger, run_dir);
        sup.set_control_path(control_path.clone());
        sup.observe_with(http.is_some(), drain_delay);
        let tx = sup.sender();
        forward_signals(tx.clone())?;
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
