//! The client commands: `herd start`, `ls`, `status`, `reload`, `restart`, `scale`, `stop`,
//! `logs`, `send`. Each talks to one supervisor over its control socket
//! ([`crate::control`]); none needs a runtime.

use std::io::Write;
use std::time::{Duration, Instant};

use comfy_table::{presets, Cell, CellAlignment, Table};
use herd_proto::control::{AppState, AppStatus, Reason, Request, Response, WorkerState};

use crate::control::{Client, ClientError};
use crate::fmt::duration_ms;
use crate::logs::line::{file_tail, sanitize, to_json_pretty};
use crate::paths::{AppName, Home};
use crate::print::{errln, outln};

/// Exit code for a command whose operation failed (a reload that kept the old version).
pub const FAILED: u8 = 1;

fn request(
    home: &Home,
    name: &AppName,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<Response, ClientError> {
    Client::connect(home, name)?.request(req, timeout)
}

/// Prints an operation's outcome; exit 0 only on success.
pub fn outcome(home: &Home, name: &AppName, req: Request) -> anyhow::Result<u8> {
    let response = request(home, name, &req, None)?;
    // Messages can quote a worker's output: escaped like every line shown on a terminal.
    let message = sanitize(&response.message);
    if response.ok {
        outln!("{name}: {message}")?;
        Ok(0)
    } else {
        errln!("error: {name}: {message}");
        Ok(FAILED)
    }
}

pub fn status(home: &Home, name: &AppName, json: bool) -> anyhow::Result<u8> {
    let response = request(home, name, &Request::Status, Some(Duration::from_secs(10)))?;
    let Some(status) = response.status else {
        anyhow::bail!("{name}: {}", response.message);
    };
    if json {
        outln!("{}", to_json_pretty(&status)?)?;
        return Ok(0);
    }
    outln!("{}", status_text(&status))?;
    Ok(0)
}

/// `herd status`'s table, header lines first.
fn status_text(status: &AppStatus) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    // Every string shown comes through the supervisor and may quote a worker (`last exit`
    // is its last output): control characters are shown escaped, never sent to the terminal.
    let header = format!(
        "{} — {} {}, {} of {} ready, balance {}, supervisor pid {} ({}), up {}",
        status.name,
        status.kind,
        status.state,
        status.ready,
        status.desired,
        status.balance,
        status.pid,
        bytes(status.supervisor_memory_bytes),
        duration_ms(status.uptime_ms)
    );
    let _ = writeln!(out, "{}", sanitize(&header));
    if !status.listen.is_empty() {
        let _ = writeln!(out, "listening on {}", sanitize(&status.listen.join(", ")));
    }
    let _ = write!(out, "{}", workers_table(&status.workers));
    out
}

/// `herd status`'s columns; each row has one cell per column.
const WORKER_COLUMNS: [&str; 11] = [
    "instance",
    "worker",
    "pid",
    "state",
    "uptime",
    "restarts",
    "cpu",
    "memory",
    "conns",
    "health",
    "last exit",
];

fn workers_table(workers: &[herd_proto::control::WorkerStatus]) -> Table {
    let mut table = Table::new();
    table.load_preset(presets::UTF8_HORIZONTAL_ONLY);
    table.set_header(WORKER_COLUMNS);
    for w in workers {
        table.add_row(worker_row(w));
    }
    table
}

/// One worker's cells, in [`WORKER_COLUMNS`] order.
fn worker_row(w: &herd_proto::control::WorkerStatus) -> Vec<Cell> {
    let or_dash = |n: u64| {
        if n == 0 {
            "-".to_string()
        } else {
            n.to_string()
        }
    };
    vec![
        Cell::new(w.instance),
        Cell::new(or_dash(w.worker_id)),
        Cell::new(or_dash(u64::from(w.pid))),
        Cell::new(w.state),
        Cell::new(duration_ms(w.uptime_ms)),
        Cell::new(sanitize(&restarts(w.restarts, &w.restarts_by_reason))),
        Cell::new(format!("{:.1}%", w.cpu_percent)).set_alignment(CellAlignment::Right),
        Cell::new(bytes(w.memory_bytes)).set_alignment(CellAlignment::Right),
        Cell::new(w.connections).set_alignment(CellAlignment::Right),
        Cell::new(sanitize(w.health.as_deref().unwrap_or("-"))),
        Cell::new(
            w.last_exit
                .as_deref()
                .map(|s| shorten(&sanitize(s), 60))
                .unwrap_or_default(),
        ),
    ]
}

pub fn ls(home: &Home, json: bool) -> anyhow::Result<u8> {
    let apps = every_app(home);
    if json {
        outln!("{}", to_json_pretty(&apps)?)?;
        return Ok(0);
    }
    outln!("{}", ls_text(home, &apps))?;
    Ok(0)
}

/// The status of every app in `HERD_HOME` that answers; a warning for each that fails.
fn every_app(home: &Home) -> Vec<AppStatus> {
    let mut apps: Vec<AppStatus> = Vec::new();
    for name in home.apps() {
        match request(home, &name, &Request::Status, Some(Duration::from_secs(5))) {
            Ok(Response {
                status: Some(status),
                ..
            }) => apps.push(status),
            Ok(_) | Err(ClientError::NotRunning(_)) => {}
            Err(e) => errln!(
                "warning: {}: {}",
                name,
                sanitize(&format!("{:#}", anyhow::Error::from(e)))
            ),
        }
    }
    apps
}

/// `herd ls`'s table.
fn ls_text(home: &Home, apps: &[AppStatus]) -> String {
    if apps.is_empty() {
        return format!("no apps running (HERD_HOME {})", home.path().display());
    }
    let mut table = Table::new();
    table.load_preset(presets::UTF8_HORIZONTAL_ONLY);
    table.set_header([
        "name", "state", "balance", "ready", "pid", "uptime", "restarts", "cpu", "memory",
        "listen", "config",
    ]);
    for a in apps {
        table.add_row(vec![
            Cell::new(sanitize(&a.name)),
            Cell::new(a.state),
            Cell::new(sanitize(&a.balance)),
            Cell::new(format!("{}/{}", a.ready, a.desired)),
            Cell::new(a.pid),
            Cell::new(duration_ms(a.uptime_ms)),
            // By reason: a reload replaces every worker, which is not a crash.
            Cell::new(restarts(a.restarts, &app_reasons(a))).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.1}%", a.cpu_percent)).set_alignment(CellAlignment::Right),
            Cell::new(bytes(a.memory_bytes)).set_alignment(CellAlignment::Right),
            Cell::new(sanitize(&a.listen.join(" "))),
            // The herd.toml it came from; `-` for the command line.
            Cell::new(sanitize(a.config.as_deref().unwrap_or("-"))),
        ]);
    }
    table.to_string()
}

/// The shortest `--watch` interval: each round is a request to every supervisor shown.
const WATCH_MIN: Duration = Duration::from_millis(100);

/// `herd status NAME --watch`: the table again every `every` until Ctrl-C, or until the app
/// is gone (exit 0 with a message; an app that is not running at the start is an error).
pub fn watch_status(home: &Home, name: &AppName, every: Duration) -> anyhow::Result<u8> {
    let mut screen = Screen::new(every)?;
    loop {
        let started = Instant::now();
        match request(home, name, &Request::Status, Some(Duration::from_secs(10))) {
            Ok(Response {
                status: Some(status),
                ..
            }) => screen.show(&status_text(&status))?,
            Ok(response) => anyhow::bail!("{name}: {}", sanitize(&response.message)),
            Err(ClientError::NotRunning(_)) if screen.rounds > 0 => {
                errln!("{name} is no longer running (stopped, or its supervisor exited)");
                return Ok(0);
            }
            Err(e) => return Err(e.into()),
        }
        screen.pause(started);
    }
}

/// `herd ls --watch`: the table of every app again every `every` until Ctrl-C.
pub fn watch_ls(home: &Home, every: Duration) -> anyhow::Result<u8> {
    let mut screen = Screen::new(every)?;
    loop {
        let started = Instant::now();
        let apps = every_app(home);
        screen.show(&ls_text(home, &apps))?;
        screen.pause(started);
    }
}

/// Where `--watch` prints: on a terminal the screen is cleared and the table drawn again in
/// place (ANSI only); into a pipe or file each table follows the last, after a line with
/// the time, so nothing written is ever taken back.
struct Screen {
    every: Duration,
    tty: bool,
    rounds: u64,
}

impl Screen {
    fn new(every: Duration) -> anyhow::Result<Self> {
        use std::io::IsTerminal;
        if every < WATCH_MIN {
            anyhow::bail!(
                "--watch {}: the interval must be at least 100ms (e.g. --watch 2s)",
                crate::fmt::human(every)
            );
        }
        Ok(Screen {
            every,
            tty: std::io::stdout().is_terminal(),
            rounds: 0,
        })
    }

    fn show(&mut self, text: &str) -> anyhow::Result<()> {
        self.rounds += 1;
        if self.tty {
            // Home, clear the screen, then the table: one write, so the terminal never
            // shows a half-drawn table for long.
            outln!("\x1b[H\x1b[2J{text}")?;
        } else {
            let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            outln!(
                "--- {now} (every {}) ---\n{text}",
                crate::fmt::human(self.every)
            )?;
        }
        Ok(())
    }

    /// Sleeps what is left of the interval.
    fn pause(&self, started: Instant) {
        std::thread::sleep(self.every.saturating_sub(started.elapsed()));
    }
}

pub fn logs(
    home: &Home,
    name: &AppName,
    lines: usize,
    follow: bool,
    instance: Option<usize>,
) -> anyhow::Result<u8> {
    let mut client = match Client::connect(home, name) {
        Ok(client) => client,
        // Stopped, crashed or killed: what it wrote is in its log file.
        Err(e @ ClientError::NotRunning(_)) => {
            return logs_from_file(home, name, lines, follow, instance, e)
        }
        Err(e) => return Err(e.into()),
    };
    let response = client.request(
        &Request::Logs {
            lines,
            follow,
            instance,
        },
        None,
    )?;
    if !response.ok {
        anyhow::bail!("{name}: {}", response.message);
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // The supervisor escapes what it keeps; escaped again here (idempotent) so nothing a
    // worker printed reaches the terminal raw, whoever answered on the socket.
    for line in &response.lines {
        // A closed stdout (`herd logs app | head`) is a normal way to stop reading.
        if writeln!(out, "{}", sanitize(&line.text)).is_err() {
            return Ok(0);
        }
    }
    if out.flush().is_err() {
        return Ok(0);
    }
    if !follow {
        return Ok(0);
    }
    while let Some(raw) = client.next_line() {
        let text = serde_json::from_str::<herd_proto::control::LogLine>(&raw)
            .map(|l| l.text)
            .unwrap_or(raw);
        if writeln!(out, "{}", sanitize(text.trim_end()))
            .and_then(|_| out.flush())
            .is_err()
        {
            return Ok(0);
        }
    }
    Ok(0)
}

/// The log file of an app whose supervisor is gone: the path it recorded in
/// `HERD_HOME/NAME.logpath`, else `HERD_HOME/NAME.log`.
fn logs_from_file(
    home: &Home,
    name: &AppName,
    lines: usize,
    follow: bool,
    instance: Option<usize>,
    not_running: ClientError,
) -> anyhow::Result<u8> {
    use std::os::unix::ffi::OsStrExt;
    let recorded = crate::logs::file::open_for_reading(&home.display(&name.file("logpath")))
        .ok()
        .and_then(|f| {
            use std::io::Read;
            let mut raw = Vec::new();
            f.take(4096).read_to_end(&mut raw).ok()?;
            (!raw.is_empty())
                .then(|| std::path::PathBuf::from(std::ffi::OsStr::from_bytes(&raw).to_os_string()))
        });
    let path = recorded.unwrap_or_else(|| home.display(&name.file("log")));
    let filter = crate::logs::read::Filter::new(name.as_str(), instance);
    match crate::logs::read::print(&path, lines, follow, &filter) {
        Ok(()) => Ok(0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(anyhow::anyhow!(
            "{not_running}, and it has no log file at {}",
            path.display()
        )),
        Err(e) => Err(anyhow::anyhow!(
            "{name} is not running; its log file {}: {e}",
            path.display()
        )),
    }
}

pub fn send(
    home: &Home,
    name: &AppName,
    json: &str,
    instance: Option<usize>,
) -> anyhow::Result<u8> {
    let data: serde_json::Value = serde_json::from_str(json).map_err(|e| {
        anyhow::anyhow!("the message is not JSON ({e}); quote it like '{{\"cmd\":\"flush\"}}'")
    })?;
    outcome(home, name, Request::Send { data, instance })
}

/// `herd stop`: asks the supervisor to stop and waits until it is gone.
pub fn stop(home: &Home, name: &AppName) -> anyhow::Result<u8> {
    let response = request(home, name, &Request::Stop, None)?;
    if !response.ok {
        anyhow::bail!("{name}: {}", response.message);
    }
    outln!("{name}: stopped")?;
    Ok(0)
}

/// `herd start`: runs `herd run` detached and waits until its workers are ready.
pub fn start(
    home: &Home,
    name: &AppName,
    run_args: Vec<std::ffi::OsString>,
    listen_timeout: Duration,
    log_path: &std::path::Path,
) -> anyhow::Result<u8> {
    let wait = listen_timeout + Duration::from_secs(10);
    use std::os::unix::process::CommandExt;
    if let Ok(mut c) = Client::connect(home, name) {
        if c.request(&Request::Status, Some(Duration::from_secs(2)))
            .is_ok()
        {
            anyhow::bail!("an app named `{name}` is already running; stop it with `herd stop {name}` or pass another --name");
        }
    }
    // What the supervisor prints outside its log (an error before the log file is open, a
    // panic) goes to HERD_HOME/NAME.stderr, emptied at each start. Opened through HERD_HOME's
    // descriptor: a link or a fifo planted there is refused.
    let stderr_file = name.file("stderr");
    let early = home.open_private_file(
        &stderr_file,
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::TRUNC,
    )?;
    // The log of this start begins where the file ends now.
    let start_offset = std::fs::symlink_metadata(log_path)
        .map(|m| m.len())
        .unwrap_or(0);
    let log_tail = |lines: usize, bytes: u64| {
        crate::logs::file::open_for_reading(log_path)
            .and_then(|log| file_tail(&log, start_offset, lines, bytes))
            .unwrap_or_default()
    };
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(run_args)
        .stdin(std::process::Stdio::null())
        .stdout(early.try_clone()?)
        .stderr(early.try_clone()?);
    // SAFETY: setsid is async-signal-safe; the detached supervisor leaves our session so a
    // terminal hangup does not reach it.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start the supervisor: {e}"))?;
    let deadline = Instant::now() + wait;
    loop {
        if let Some(status) = child.try_wait()? {
            // The log is appended to by every start of this app: read only its end.
            let mut tail = log_tail(15, 64 * 1024);
            tail.extend(file_tail(&early, 0, 15, 64 * 1024).unwrap_or_default());
            errln!(
                "error: {name} did not start ({}):",
                crate::fmt::describe_status(&status)
            );
            for line in tail {
                errln!("  {}", sanitize(&line));
            }
            return Ok(FAILED);
        }
        if let Ok(Response {
            status: Some(s), ..
        }) = request(home, name, &Request::Status, Some(Duration::from_secs(2)))
        {
            if s.ready == s.desired && s.state == AppState::Running {
                outln!("{name}: started {} workers (supervisor pid {}, logs: herd logs {name}, file {})", s.ready, s.pid, log_path.display())?;
                return Ok(0);
            }
            let crashing = s
                .workers
                .iter()
                .find(|w| w.restarts >= 2 && w.state != WorkerState::Ready);
            if s.state == AppState::Errored || crashing.is_some() {
                let why = crashing
                    .or_else(|| s.workers.first())
                    .and_then(|w| {
                        w.last_exit
                            .clone()
                            .map(|e| format!("{name}[{}] {e}", w.instance))
                    })
                    .unwrap_or_else(|| "see herd logs".into());
                errln!(
                    "error: {name} did not start: its workers keep exiting. {}",
                    sanitize(&why)
                );
                let _ = request(home, name, &Request::Stop, Some(Duration::from_secs(30)));
                return Ok(FAILED);
            }
            // Up past --listen-timeout and still not ready: it is not serving (the
            // supervisor logged why, with a hint).
            let limit = listen_timeout.as_millis() as u64 + 500;
            if let Some(w) = s
                .workers
                .iter()
                .find(|w| w.state == WorkerState::Starting && w.uptime_ms >= limit)
            {
                errln!(
                    "error: {name} did not start: worker {} was not ready within --listen-timeout {}s",
                    w.instance,
                    listen_timeout.as_secs_f64()
                );
                let tail = log_tail(200, 256 * 1024);
                if let Some(line) = tail.iter().rev().find(|l| l.contains("not ready after")) {
                    errln!("  {}", sanitize(line));
                }
                let _ = request(home, name, &Request::Stop, Some(Duration::from_secs(30)));
                return Ok(FAILED);
            }
        }
        if Instant::now() > deadline {
            errln!("error: {name} is running but its workers were not all ready within {}s; see herd status {name}", wait.as_secs());
            return Ok(FAILED);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every worker's restarts by reason, added up.
fn app_reasons(a: &herd_proto::control::AppStatus) -> std::collections::BTreeMap<Reason, u32> {
    let mut all = std::collections::BTreeMap::new();
    for w in &a.workers {
        for (reason, n) in &w.restarts_by_reason {
            *all.entry(*reason).or_insert(0) += n;
        }
    }
    all
}

/// `3 (crash 2, memory 1)`.
fn restarts(total: u32, by_reason: &std::collections::BTreeMap<Reason, u32>) -> String {
    if by_reason.is_empty() {
        return total.to_string();
    }
    let parts: Vec<String> = by_reason.iter().map(|(k, v)| format!("{k} {v}")).collect();
    format!("{total} ({})", parts.join(", "))
}

pub(crate) fn bytes(n: u64) -> String {
    match n {
        0 => "-".into(),
        n if n >= 1 << 30 => format!("{:.1} GB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MB", n as f64 / (1u64 << 20) as f64),
        n => format!("{} KB", n / 1024),
    }
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_proto::control::WorkerStatus;

    fn worker() -> WorkerStatus {
        WorkerStatus {
            instance: 1,
            worker_id: 7,
            pid: 4242,
            state: WorkerState::Ready,
            uptime_ms: 61_000,
            restarts: 3,
            last_exit: Some("code 1".into()),
            cpu_percent: 1.5,
            memory_bytes: 3 << 20,
            connections: 12,
            status_text: None,
            health: Some("ok (200)".into()),
            restarts_by_reason: [(Reason::Crash, 2), (Reason::Memory, 1)].into(),
        }
    }

    #[test]
    fn status_rows_have_one_cell_per_header() {
        assert_eq!(worker_row(&worker()).len(), WORKER_COLUMNS.len());
    }

    #[test]
    fn status_shows_health_and_last_exit_under_their_headers() {
        let text = workers_table(&[worker()]).to_string();
        let lines: Vec<&str> = text.lines().collect();
        let header = lines
            .iter()
            .find(|l| l.contains("instance"))
            .expect("header");
        let row = lines.iter().find(|l| l.contains("4242")).expect("row");
        let column = |line: &str, text: &str| {
            line.find(text)
                .map(|byte| line[..byte].chars().count())
                .expect(text)
        };
        assert_eq!(column(header, "health"), column(row, "ok (200)"), "{text}");
        assert_eq!(column(header, "last exit"), column(row, "code 1"), "{text}");
        assert!(row.contains("3 (crash 2, memory 1)"), "{text}");
    }
}
