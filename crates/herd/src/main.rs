//! herd: run any server program as N workers on one shared port.
//!
//! `main` parses the command line into a [`spec::Spec`], resolves it into a [`plan::Plan`]
//! (program found, sockets bound) and hands that to the [`supervisor`] on a single-threaded
//! tokio runtime. Every error a user can cause ends here as one `error: …` line and a
//! non-zero exit.

mod balance;
mod cli;
mod logs;
mod node;
mod paths;
mod plan;
mod spawn;
mod spec;
mod supervisor;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::supervisor::{SignalKind, Supervisor};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    match cli.command {
        Command::Run(args) => match run(args) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        },
    }
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
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("error: invalid command line");
    eprintln!("{first}");
    ExitCode::from(2)
}

fn run(args: cli::RunArgs) -> anyhow::Result<u8> {
    let spec = args.into_spec();
    let log_format = spec.log_format;
    let name = spec.name.clone();
    let home = paths::herd_home().map_err(anyhow::Error::msg)?;
    paths::private_dir(&home).map_err(anyhow::Error::msg)?;
    let run_dir = home.join(format!("{name}-{}", std::process::id()));
    paths::private_dir(&run_dir).map_err(anyhow::Error::msg)?;
    let plan = match plan::plan(spec) {
        Ok(plan) => plan,
        Err(e) => {
            let _ = std::fs::remove_dir(&run_dir);
            return Err(e.into());
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let code = local.block_on(&runtime, async move {
        let logger = logs::Logger::new(&name, log_format);
        let (sup, rx) = Supervisor::new(plan, logger, run_dir);
        let tx = sup.sender();
        forward_signals(tx)?;
        anyhow::Ok(sup.run(rx).await)
    })?;
    Ok(u8::try_from(code).unwrap_or(1))
}

/// Turns SIGTERM and SIGINT into supervisor events.
fn forward_signals(
    tx: tokio::sync::mpsc::UnboundedSender<supervisor::Event>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind as Kind};
    for (kind, ours) in [
        (Kind::terminate(), SignalKind::Terminate),
        (Kind::interrupt(), SignalKind::Interrupt),
    ] {
        let mut stream = signal(kind)?;
        let tx = tx.clone();
        tokio::task::spawn_local(async move {
            while stream.recv().await.is_some() {
                if tx.send(supervisor::Event::Signal(ours)).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}
