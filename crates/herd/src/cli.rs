//! The command line: clap definitions and their translation into a [`Spec`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::paths::AppName;
use crate::spec::{
    self, Balance, Health, HealthCheck, Instances, ListenAddr, LogFormat, Policy, Ready, Spec,
};

#[derive(Debug, Parser)]
#[command(
    name = "herd",
    version,
    about = "Run any server program as N workers on one shared port"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run an app in the foreground: bind its sockets, start N workers, keep them running.
    Run(RunArgs),
    /// The same as run, detached; returns once the workers are ready.
    Start(RunArgs),
    /// Every running app, one line each.
    Ls {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Print the table again every INTERVAL until Ctrl-C (on a terminal: redrawn in place).
        #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "2s", allow_hyphen_values = true, value_parser = spec::parse_positive_duration, conflicts_with = "json")]
        watch: Option<Duration>,
    },
    /// One app, one line per worker.
    Status {
        #[arg(value_parser = clap::value_parser!(AppName))]
        name: AppName,
        /// Machine-readable output (field names are stable).
        #[arg(long)]
        json: bool,
        /// Print the table again every INTERVAL until Ctrl-C or the app stops (on a terminal:
        /// redrawn in place). Put it after NAME: `herd status web --watch 5s`.
        #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "2s", allow_hyphen_values = true, value_parser = spec::parse_positive_duration, conflicts_with = "json")]
        watch: Option<Duration>,
    },
    /// Rolling, zero-downtime replacement of every worker; keeps the old ones if the new fail.
    Reload {
        #[arg(value_parser = clap::value_parser!(AppName))]
        name: AppName,
        /// Slots replaced at a time.
        #[arg(long, default_value_t = 1, allow_negative_numbers = true, value_parser = spec::parse_positive_count_usize)]
        parallel: usize,
    },
    /// Stop every worker, then start them again; with --instance, replace one worker
    /// gracefully (its successor is ready before it stops).
    Restart {
        #[arg(value_parser = clap::value_parser!(AppName))]
        name: AppName,
        /// Only this worker slot: start a new worker, and stop the old one once it is ready.
        #[arg(long, allow_negative_numbers = true, value_parser = spec::parse_count_usize)]
        instance: Option<usize>,
    },
    /// Change the number of workers: N, +K or -K.
    Scale {
        #[arg(value_parser = clap::value_parser!(AppName))]
        name: AppName,
        #[arg(allow_hyphen_values = true, value_name = "N|+K|-K")]
        to: String,
    },
    /// Stop the app gracefully; the supervisor exits.
    Stop {
        #[arg(value_parser = clap::value_parser!(AppName))]
        name: AppName,
    },
    /// Print (and follow) the app's recent output.
    Logs {
        #[arg(value_parser = clap::value_parser!(AppName))]
        name: AppName,
        /// How many recent lines.
        #[arg(short = 'n', long, default_value_t = 100, allow_negative_numbers = true, value_parser = spec::parse_count_usize)]
        lines: usize,
        /// Keep printing new lines.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only this worker slot.
        #[arg(long, allow_negative_numbers = true, value_parser = spec::parse_count_usize)]
        instance: Option<usize>,
    },
    /// Send a JSON message to the workers' process.on('message').
    Send {
        #[arg(value_parser = clap::value_parser!(AppName))]
        name: AppName,
        json: String,
        /// Only this worker slot.
        #[arg(long, allow_negative_numbers = true, value_parser = spec::parse_count_usize)]
        instance: Option<usize>,
    },
    /// Make the running apps match a herd.toml: start, stop, scale, reload or restart each.
    Apply {
        /// The herd.toml.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Print the plan, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print a herd.toml made from a PM2 ecosystem file (evaluated with node).
    Import {
        /// The ecosystem.config.js (or .cjs, .mjs, .json).
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Merge each app's env_NAME over its env (PM2's --env NAME).
        #[arg(long, value_name = "NAME")]
        env: Option<String>,
    },
    /// A terminal dashboard of every app: workers, CPU and memory, the log tail; keys to
    /// reload, restart a worker and scale (needs a terminal; else see `status --watch`).
    Monit,
    /// Print (or --install) a service unit that runs herd at boot.
    Startup {
        #[command(subcommand)]
        manager: StartupManager,
    },
}

/// The service managers `herd startup` writes units for.
#[derive(Debug, Subcommand)]
pub enum StartupManager {
    /// A systemd unit (Type=notify) running `herd run ARGS`, or a herd@.service template
    /// for a herd.toml.
    Systemd(crate::startup::SystemdArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Number of workers: a count, or `max` for one per available core.
    #[arg(short = 'i', long, value_name = "N|max", default_value = "max", allow_hyphen_values = true, value_parser = clap::value_parser!(Instances))]
    pub instances: Instances,

    /// Address to listen on (repeatable): PORT, HOST:PORT, [V6]:PORT or unix:PATH.
    #[arg(short = 'l', long, value_name = "ADDR", value_parser = clap::value_parser!(ListenAddr))]
    pub listen: Vec<ListenAddr>,

    /// App name for logs and control [default: the APP file's stem].
    #[arg(short = 'n', long, value_parser = clap::value_parser!(AppName))]
    pub name: Option<AppName>,

    /// Extra environment for the workers (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = spec::parse_env)]
    pub env: Vec<(String, String)>,

    /// Working directory of the workers [default: herd's].
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,

    /// Run the workers as this user (and its primary group); herd must run as root.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// How long a stopping worker gets before SIGKILL.
    #[arg(long, value_name = "DURATION", default_value = "5s", allow_hyphen_values = true, value_parser = spec::parse_duration)]
    pub kill_timeout: Duration,

    /// First step of the crash-restart backoff (x1.5 per unstable restart, at most 15s).
    #[arg(long, value_name = "DURATION", default_value = "100ms", allow_hyphen_values = true, value_parser = spec::parse_duration)]
    pub restart_delay: Duration,

    /// A worker that stays up this long is stable: the backoff resets.
    #[arg(long, value_name = "DURATION", default_value = "1s", allow_hyphen_values = true, value_parser = spec::parse_duration)]
    pub min_uptime: Duration,

    /// Unstable restarts in a row before a worker slot is marked errored.
    #[arg(long, value_name = "N", default_value_t = 15, allow_negative_numbers = true, value_parser = spec::parse_count_u32)]
    pub max_restarts: u32,

    /// Do not restart workers that exit on their own.
    #[arg(long)]
    pub no_autorestart: bool,

    /// Output format of herd's events and the workers' lines.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// How connections reach workers: round-robin, shared, sticky, hash
    /// [default: round-robin for Node, shared otherwise].
    #[arg(long, value_enum)]
    pub balance: Option<Balance>,

    /// --balance sticky: how long a slot without a ready worker keeps its clients waiting for
    /// the next one before they move to their next slot.
    #[arg(long, value_name = "DURATION", default_value = "2s", allow_hyphen_values = true, value_parser = spec::parse_duration)]
    pub sticky_wait: Duration,

    /// Interpreter for a script APP (e.g. a specific node binary).
    #[arg(long, value_name = "PATH")]
    pub interpreter: Option<String>,

    /// When a worker is ready: listening, message, notify or delay:DURATION
    /// [default: listening for Node, READY=1 or 1s up for others].
    #[arg(long, value_name = "WHEN", value_parser = clap::value_parser!(Ready))]
    pub ready: Option<Ready>,

    /// Node: a worker is ready when it calls process.send('ready') (same as --ready message).
    #[arg(long)]
    pub wait_ready: bool,

    /// Node: do not load herd's keep-alive drain into workers (by default a stopping worker
    /// answers with `Connection: close` and closes idle keep-alive sockets after a grace,
    /// instead of Node's immediate close that races with clients' next requests).
    #[arg(long)]
    pub no_keepalive_drain: bool,

    /// How long a new worker may take to become ready.
    #[arg(long, value_name = "DURATION", default_value = "10s", allow_hyphen_values = true, value_parser = spec::parse_positive_duration)]
    pub listen_timeout: Duration,

    /// A ready worker silent this long is hung and replaced: no WATCHDOG=1 (socket
    /// activation), no answer to herd's event-loop ping, or a hand-off unanswered (Node).
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true, value_parser = spec::parse_positive_duration)]
    pub watchdog: Option<Duration>,

    /// Probe each worker with GET PATH; replace it after --health-failures failures in a row.
    #[arg(long, value_name = "PATH")]
    pub health_check: Option<String>,

    /// Time between two probes of a worker.
    #[arg(long, value_name = "DURATION", default_value = "10s", allow_hyphen_values = true, value_parser = spec::parse_positive_duration)]
    pub health_interval: Duration,

    /// How long a probe may take.
    #[arg(long, value_name = "DURATION", default_value = "2s", allow_hyphen_values = true, value_parser = spec::parse_positive_duration)]
    pub health_timeout: Duration,

    /// Failed probes in a row before the worker is replaced.
    #[arg(long, value_name = "N", default_value_t = 3, allow_negative_numbers = true, value_parser = spec::parse_positive_count_u32)]
    pub health_failures: u32,

    /// Replace a worker whose resident memory passes SIZE (300M, 1G); checked every second.
    #[arg(long, value_name = "SIZE", value_parser = spec::parse_size)]
    pub max_memory: Option<u64>,

    /// Replace a worker after herd handed it N connections (round-robin).
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = spec::parse_positive_count)]
    pub max_requests: Option<u64>,

    /// Up to N more connections, chosen per worker, so workers recycle at different times.
    #[arg(long, value_name = "N", default_value_t = 0, allow_negative_numbers = true, value_parser = spec::parse_count)]
    pub max_requests_jitter: u64,

    /// Replace a worker once it has run this long.
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true, value_parser = spec::parse_positive_duration)]
    pub max_age: Option<Duration>,

    /// Up to this much longer, chosen per worker.
    #[arg(long, value_name = "DURATION", default_value = "0s", allow_hyphen_values = true, value_parser = spec::parse_duration)]
    pub max_age_jitter: Duration,

    /// Write the log (every worker line and herd event, one file for all instances) to this
    /// file instead of stdout [`herd start`: HERD_HOME/NAME.log].
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,

    /// Rotate the log file before it passes SIZE (10M, 1G); 0: never (an external logrotate
    /// renames it and sends SIGUSR1).
    #[arg(long, value_name = "SIZE", default_value = "10M", value_parser = parse_log_size)]
    pub log_max_size: u64,

    /// Rotated log files kept: NAME.1 (newest) … NAME.N; older ones are removed.
    #[arg(long, value_name = "N", default_value_t = crate::logs::file::DEFAULT_KEEP, allow_negative_numbers = true, value_parser = spec::parse_count_usize)]
    pub log_keep: usize,

    /// gzip rotated log files (NAME.1.gz …), on a thread of their own.
    #[arg(long)]
    pub log_compress: bool,

    /// Run the workers with this primary group (name or number) instead of --user's; the
    /// supplementary groups are --user's groups (as initgroups). herd must run as root.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,

    /// Serve /metrics, /ready, /live, /status, /events and a dashboard on ADDR (PORT,
    /// IP:PORT; a bare port is on 127.0.0.1). See docs/observability.md.
    #[arg(long, value_name = "ADDR", value_parser = crate::http::parse_addr)]
    pub http: Option<std::net::SocketAddr>,

    /// Bearer token --http requires for its data (needed for a non-loopback ADDR); better
    /// passed as HERD_HTTP_TOKEN, which `ps` does not show.
    #[arg(long, value_name = "TOKEN")]
    pub http_token: Option<String>,

    /// --http: /ready answers 200 while at least N workers are ready.
    #[arg(long, value_name = "N", default_value_t = 1, allow_negative_numbers = true, value_parser = spec::parse_positive_count_usize)]
    pub ready_min: usize,

    /// On herd stop / SIGTERM / SIGINT, answer 503 on /ready and keep serving this long
    /// before the graceful stop (time for load balancers to notice).
    #[arg(long, value_name = "DURATION", default_value = "0s", allow_hyphen_values = true, value_parser = spec::parse_duration)]
    pub drain_delay: Duration,

    /// With a herd.toml as APP: the app of the file to run (`herd start`: all by default).
    #[arg(long = "app", id = "config_app", value_name = "NAME", value_parser = clap::value_parser!(AppName))]
    pub config_app: Option<AppName>,

    /// The program or script to run (a .js file runs as a Node cluster worker), or a
    /// herd.toml (a path ending in .toml) whose apps to run.
    #[arg(value_name = "APP")]
    pub app: String,

    /// Arguments for the program.
    #[arg(
        value_name = "ARGS",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub args: Vec<String>,
}

impl RunArgs {
    pub fn into_spec(self) -> Spec {
        let name = self
            .name
            .map(AppName::into_string)
            .unwrap_or_else(|| default_name(&self.app, &self.args));
        let ready = if self.wait_ready {
            Some(Ready::Message)
        } else {
            self.ready
        };
        Spec {
            name,
            program: self.app,
            args: self.args,
            interpreter: self.interpreter,
            instances: self.instances,
            listen: self.listen,
            env: self.env,
            cwd: self.cwd,
            user: self.user,
            group: self.group,
            balance: self.balance,
            ready,
            policy: Policy {
                kill_timeout: self.kill_timeout,
                restart_delay: self.restart_delay,
                min_uptime: self.min_uptime,
                max_restarts: self.max_restarts,
                autorestart: !self.no_autorestart,
                listen_timeout: self.listen_timeout,
                sticky_wait: self.sticky_wait,
            },
            health: Health {
                watchdog: self.watchdog,
                check: self.health_check.map(|path| HealthCheck {
                    path,
                    interval: self.health_interval,
                    timeout: self.health_timeout,
                    failures: self.health_failures,
                }),
                max_memory: self.max_memory,
                max_requests: self.max_requests,
                max_requests_jitter: self.max_requests_jitter,
                max_age: self.max_age,
                max_age_jitter: self.max_age_jitter,
            },
            keepalive_drain: !self.no_keepalive_drain,
            log_format: self.log_format,
        }
    }
}

/// The stem of the script when the program is an interpreter (`node app.js` → `app`),
/// else the program's own stem.
fn default_name(app: &str, args: &[String]) -> String {
    let interpreter = matches!(
        file_stem(app).as_str(),
        "node" | "python3" | "python" | "ruby" | "sh" | "bash"
    );
    let script = args.iter().find(|a| !a.starts_with('-'));
    let stem = match (interpreter, script) {
        (true, Some(script)) => file_stem(script),
        _ => file_stem(app),
    };
    let clean = clean_name(&stem);
    if AppName::new(&clean).is_ok() {
        clean
    } else {
        "app".into()
    }
}

/// `s` made into what an app name may be: letters, digits, `-`, `_`, `.` (others become
/// `_`), at most 64, starting with a letter or digit, no `..`. May come out empty.
pub fn clean_name(s: &str) -> String {
    let clean: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let mut clean = clean
        .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    while clean.contains("..") {
        clean = clean.replace("..", "._");
    }
    clean
}

fn file_stem(path: &str) -> String {
    std::path::Path::new(path)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `--log-max-size`: a size of at least 1K, or 0 for no rotation.
fn parse_log_size(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    let size = spec::parse_size(s)?;
    if size < crate::logs::file::MIN_MAX_SIZE {
        return Err(format!(
            "`{s}` is too small for a log file; write at least 1K, or 0 to never rotate"
        ));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_script() {
        assert_eq!(default_name("app.js", &[]), "app");
        assert_eq!(default_name("./bin/my server", &[]), "my_server");
        assert_eq!(
            default_name("node", &["--inspect".into(), "srv.js".into()]),
            "srv"
        );
        assert_eq!(default_name("/usr/bin/python3", &["api.py".into()]), "api");
        assert_eq!(default_name("_x..y.js", &[]), "x._y");
        assert_eq!(default_name("...", &[]), "app");
    }

    #[test]
    fn flags_parse_into_a_spec() {
        let cli = Cli::try_parse_from([
            "herd",
            "run",
            "-i",
            "4",
            "-l",
            "127.0.0.1:0",
            "--kill-timeout",
            "2s",
            "app.js",
            "--",
            "--port",
            "1",
        ])
        .expect("parses");
        let Command::Run(run) = cli.command else {
            panic!("parsed as run")
        };
        let spec = run.into_spec();
        assert_eq!(spec.instances, Instances::Count(4));
        assert_eq!(spec.policy.kill_timeout, Duration::from_secs(2));
        assert_eq!(spec.args, vec!["--port", "1"]);
        assert_eq!(spec.name, "app");
    }

    #[test]
    fn bad_values_name_the_flag() {
        let err = Cli::try_parse_from(["herd", "run", "-i", "0", "x"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--instances") && err.contains("at least 1"),
            "{err}"
        );
        for (args, says) in [
            (&["--watchdog", "0s"][..], "greater than 0"),
            (&["--health-failures", "0"][..], "at least 1"),
            (&["-i", "-3"][..], "at least 1"),
            (&["--max-restarts", "-1"][..], "negative"),
            (&["--kill-timeout", "-1s"][..], "negative"),
        ] {
            let mut argv = vec!["herd", "run"];
            argv.extend_from_slice(args);
            argv.push("x");
            let err = Cli::try_parse_from(argv).unwrap_err().to_string();
            assert!(
                err.contains(says) && !err.contains("unexpected"),
                "{args:?}: {err}"
            );
        }
        let err = Cli::try_parse_from(["herd", "run", "--kill-timeout", "5", "x"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--kill-timeout") && err.contains("no unit"),
            "{err}"
        );
    }
}
