//! What the user asked for, validated, with no I/O.
//!
//! The CLI (and later `herd.toml`) produce a [`Spec`]; everything here is pure parsing and
//! checking so it can be unit-tested without processes or sockets. Resolving the spec against
//! the machine (finding the program, binding sockets) is [`crate::plan`]'s job.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A user-facing problem with the command line, phrased so the user knows what to change.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{flag}: {problem}")]
    Invalid { flag: &'static str, problem: String },
}

fn invalid(flag: &'static str, problem: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        flag,
        problem: problem.into(),
    }
}

/// The most workers an app may have (`-i`, `herd scale`).
pub const MAX_WORKERS: usize = 1024;

/// Refuses a worker count above [`MAX_WORKERS`], saying so.
pub fn check_worker_count(n: usize) -> Result<usize, String> {
    if n > MAX_WORKERS {
        return Err(format!(
            "{n} is more than the {MAX_WORKERS} workers herd allows"
        ));
    }
    Ok(n)
}

/// How many workers: a number, or one per available core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instances {
    Count(usize),
    Max,
}

impl FromStr for Instances {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "max" {
            return Ok(Instances::Max);
        }
        if s.strip_prefix('-').is_some_and(is_whole) {
            return Err(format!(
                "`{s}` is negative: must be at least 1 (or `max` for one per core)"
            ));
        }
        match s.parse::<usize>() {
            Ok(0) => Err("must be at least 1 (or `max` for one per core)".into()),
            Ok(n) => check_worker_count(n).map(Instances::Count),
            Err(_) => Err(format!(
                "`{s}` is not a number; use a count like 4, or `max`"
            )),
        }
    }
}

impl Instances {
    /// The number of workers on this machine: `max` is the CPUs herd may use (affinity
    /// mask and cgroup v2 quota, see cpus.rs).
    pub fn resolve(self) -> usize {
        match self {
            Instances::Count(n) => n,
            Instances::Max => crate::cpus::available(),
        }
    }
}

/// Parses `250ms`, `5s`, `1m`, `1h`, `1.5s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.starts_with('-') {
        return Err(format!(
            "`{s}` is negative; a duration is 0 or more, like 250ms, 5s, 1m or 1h"
        ));
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "" => {
            return Err(format!(
                "`{s}` has no unit; write it like 250ms, 5s, 1m or 1h"
            ))
        }
        _ => return Err(format!("`{s}`: unknown unit `{unit}`; use ms, s, m or h")),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 250ms, 5s, 1m"))?;
    let secs = value * scale;
    if !secs.is_finite() || secs > 31_536_000.0 {
        return Err(format!("`{s}` is too long (more than a year)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A duration that must not be zero (`--watchdog`, `--health-interval`, …): 0 would mean
/// "always late" or "check without pause", never what anyone wants.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!(
            "`{s}`: must be greater than 0, like 250ms, 5s or 1m"
        ));
    }
    Ok(d)
}

fn is_whole(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// A whole number >= 0 for a count flag, with an error that says what is wrong.
pub fn parse_count(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.strip_prefix('-').is_some_and(is_whole) {
        return Err(format!("`{s}` is negative; give a whole number, 0 or more"));
    }
    if !is_whole(t) {
        return Err(format!("`{s}` is not a whole number like 3"));
    }
    t.parse().map_err(|_| format!("`{s}` is too large"))
}

/// [`parse_count`], at least 1.
pub fn parse_positive_count(s: &str) -> Result<u64, String> {
    match parse_count(s)? {
        0 => Err(format!("`{s}`: must be at least 1")),
        n => Ok(n),
    }
}

/// [`parse_count`] for a `u32` flag.
pub fn parse_count_u32(s: &str) -> Result<u32, String> {
    u32::try_from(parse_count(s)?).map_err(|_| format!("`{s}` is too large"))
}

/// [`parse_positive_count`] for a `u32` flag.
pub fn parse_positive_count_u32(s: &str) -> Result<u32, String> {
    u32::try_from(parse_positive_count(s)?).map_err(|_| format!("`{s}` is too large"))
}

/// [`parse_count`] for a `usize` flag.
pub fn parse_count_usize(s: &str) -> Result<usize, String> {
    usize::try_from(parse_count(s)?).map_err(|_| format!("`{s}` is too large"))
}

/// [`parse_positive_count`] for a `usize` flag.
pub fn parse_positive_count_usize(s: &str) -> Result<usize, String> {
    usize::try_from(parse_positive_count(s)?).map_err(|_| format!("`{s}` is too large"))
}

/// One address herd listens on for the workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The longest path a unix socket address can hold (sun_path is 108 bytes with its NUL).
pub const UNIX_PATH_MAX: usize = 107;

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("`unix:` needs a path, like unix:/run/app.sock".into());
            }
            if path.len() > UNIX_PATH_MAX {
                return Err(format!(
                    "unix socket path is {} bytes, longer than the {UNIX_PATH_MAX} the OS allows; use a shorter path",
                    path.len()
                ));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        let hint =
            "use PORT, HOST:PORT, [V6]:PORT or unix:PATH (e.g. 3000, 127.0.0.1:3000, [::1]:3000)";
        if let Ok(port) = s.parse::<u16>() {
            return Ok(ListenAddr::Tcp(SocketAddr::from(([0, 0, 0, 0], port))));
        }
        if s.chars().all(|c| c.is_ascii_digit()) && !s.is_empty() {
            return Err(format!("port `{s}` is out of range (0-65535)"));
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ListenAddr::Tcp(addr));
        }
        if let Some((host, port)) = s.rsplit_once(':') {
            let port: u16 = port
                .parse()
                .map_err(|_| format!("`{s}`: `{port}` is not a port; {hint}"))?;
            if host == "localhost" {
                return Ok(ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
            }
            if host.is_empty() || host == "*" {
                return Ok(ListenAddr::Tcp(SocketAddr::from(([0, 0, 0, 0], port))));
            }
            return Err(format!("`{host}` is not an IP address; {hint}"));
        }
        Err(format!("`{s}` is not an address; {hint}"))
    }
}

/// How connections reach workers (`--balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// herd accepts each connection and hands it to the next free worker.
    RoundRobin,
    /// Every worker accepts from one inherited socket; the kernel balances.
    Shared,
    /// Every worker slot has its own socket (one SO_REUSEPORT group); the kernel keeps a
    /// client address on one slot (a BPF program herd attaches).
    Sticky,
    /// Every worker slot has its own socket; the kernel spreads connections over the ready
    /// slots by the connection's hash.
    Hash,
}

impl Balance {
    /// Kernel balancing: a socket per slot, routed by herd's BPF program.
    pub fn per_slot(self) -> bool {
        matches!(self, Balance::Sticky | Balance::Hash)
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Balance::RoundRobin => "round-robin",
            Balance::Shared => "shared",
            Balance::Sticky => "sticky",
            Balance::Hash => "hash",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// When a worker counts as ready (`--ready`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// Node: the first `listening`.
    Listening,
    /// Node: `process.send('ready')`.
    Message,
    /// `READY=1` on the notify socket.
    Notify,
    /// Up this long (or `READY=1`, whichever comes first).
    Delay(Duration),
}

impl FromStr for Ready {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "listening" => Ok(Ready::Listening),
            "message" => Ok(Ready::Message),
            "notify" => Ok(Ready::Notify),
            _ => match s.strip_prefix("delay:") {
                Some(d) => Ok(Ready::Delay(parse_duration(d)?)),
                None => Err(format!(
                    "`{s}`: use listening, message, notify or delay:DURATION (e.g. delay:1s)"
                )),
            },
        }
    }
}

/// How a worker is told about its sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerKind {
    /// Node's cluster IPC protocol: the app's `listen()` asks herd.
    Node,
    /// systemd socket activation: `LISTEN_FDS` and fds 3..
    SocketActivation,
}

/// Restart and stop timing, with the defaults documented on each CLI flag.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub kill_timeout: Duration,
    pub restart_delay: Duration,
    pub min_uptime: Duration,
    pub max_restarts: u32,
    pub autorestart: bool,
    pub listen_timeout: Duration,
    /// `--balance sticky`: how long an empty slot keeps its clients (their connections wait
    /// for its next worker) before they move to their next slot.
    pub sticky_wait: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            kill_timeout: Duration::from_secs(5),
            restart_delay: Duration::from_millis(100),
            min_uptime: Duration::from_secs(1),
            max_restarts: 15,
            autorestart: true,
            listen_timeout: Duration::from_secs(10),
            sticky_wait: Duration::from_secs(2),
        }
    }
}

/// One app, as the user described it.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub program: String,
    pub args: Vec<String>,
    pub interpreter: Option<String>,
    pub instances: Instances,
    pub listen: Vec<ListenAddr>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    /// `--user`: the workers' user name.
    pub user: Option<String>,
    /// `--group`: the workers' primary group (name or number) instead of the user's.
    pub group: Option<String>,
    pub balance: Option<Balance>,
    pub ready: Option<Ready>,
    pub policy: Policy,
    pub health: Health,
    /// Node: load herd's keep-alive drain (`--no-keepalive-drain` turns it off).
    pub keepalive_drain: bool,
    pub log_format: LogFormat,
}

/// Health checks and limits (`--watchdog`, `--health-check`, `--max-*`). All off by default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Health {
    /// A ready worker silent this long (no `WATCHDOG=1`, no answer to herd's event-loop
    /// ping, a hand-off not acknowledged) is hung.
    pub watchdog: Option<Duration>,
    pub check: Option<HealthCheck>,
    /// Resident memory in bytes, sampled every second.
    pub max_memory: Option<u64>,
    /// Connections herd handed to one worker (round-robin).
    pub max_requests: Option<u64>,
    /// Up to this many more, chosen per worker, so workers do not all recycle together.
    pub max_requests_jitter: u64,
    pub max_age: Option<Duration>,
    pub max_age_jitter: Duration,
}

/// `--health-check PATH`: an HTTP GET to each worker individually.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub path: String,
    /// Between probes of one worker (default 10s).
    pub interval: Duration,
    /// For one probe's answer (default 2s).
    pub timeout: Duration,
    /// Failures in a row before the worker is replaced (default 3).
    pub failures: u32,
}

/// Parses `300M`, `1G`, `512K`, `1000000` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let scale: f64 = match unit.to_ascii_uppercase().trim_end_matches('B') {
        "" => 1.0,
        "K" => 1024.0,
        "M" => 1024.0 * 1024.0,
        "G" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}`; write a size like 300M or 1G"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 300M or 1G"))?;
    let bytes = value * scale;
    if !(1.0..=1e15).contains(&bytes) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(bytes as u64)
}

/// Parses `KEY=VALUE` for `--env`.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` has no `=`; write KEY=VALUE"))?;
    let valid = !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "`{key}` is not a variable name (letters, digits and _)"
        ));
    }
    Ok((key.to_string(), value.to_string()))
}

/// Checks a whole spec for combinations no single flag parser can see.
pub fn validate(spec: &Spec, kind: WorkerKind) -> Result<(), SpecError> {
    if !valid_name(&spec.name) {
        return Err(invalid(
            "--name",
            format!(
                "`{}` is not a usable app name: use letters, digits, `-`, `_` and `.`, up to 64",
                spec.name
            ),
        ));
    }
    if kind == WorkerKind::SocketActivation {
        if spec.balance == Some(Balance::RoundRobin) {
            return Err(invalid(
                "--balance",
                "round-robin needs a worker that takes connections from herd (Node); socket-activation workers accept for themselves: use --balance hash, sticky or shared",
            ));
        }
        if matches!(spec.ready, Some(Ready::Listening | Ready::Message)) {
            return Err(invalid(
                "--ready",
                "listening and message are Node readiness signals; for this program use notify or delay:DURATION",
            ));
        }
    }
    Ok(())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5").unwrap_err().contains("no unit"));
        assert!(parse_duration("5x").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("1..2s").is_err());
    }

    #[test]
    fn zero_and_negative_values_say_so() {
        assert!(parse_duration("-5s").unwrap_err().contains("negative"));
        assert!(parse_positive_duration("0s")
            .unwrap_err()
            .contains("greater than 0"));
        assert_eq!(parse_positive_duration("1ms"), Ok(Duration::from_millis(1)));
        assert!(parse_count("-1").unwrap_err().contains("negative"));
        assert!(parse_count("x").unwrap_err().contains("not a whole number"));
        assert!(parse_count("+3").is_err());
        assert_eq!(parse_count("0"), Ok(0));
        assert!(parse_positive_count("0")
            .unwrap_err()
            .contains("at least 1"));
        assert!(parse_count_u32("4294967296")
            .unwrap_err()
            .contains("too large"));
        assert!("-3"
            .parse::<Instances>()
            .unwrap_err()
            .contains("at least 1"));
    }

    #[test]
    fn instances_reject_zero_and_words() {
        assert_eq!("4".parse::<Instances>(), Ok(Instances::Count(4)));
        assert_eq!("max".parse::<Instances>(), Ok(Instances::Max));
        assert!("0".parse::<Instances>().unwrap_err().contains("at least 1"));
        assert!("four"
            .parse::<Instances>()
            .unwrap_err()
            .contains("not a number"));
        assert!(Instances::Max.resolve() >= 1);
    }

    #[test]
    fn listen_addresses_in_every_form() {
        let tcp = |s: &str| match s.parse::<ListenAddr>() {
            Ok(ListenAddr::Tcp(a)) => a.to_string(),
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(tcp("3000"), "0.0.0.0:3000");
        assert_eq!(tcp("127.0.0.1:3000"), "127.0.0.1:3000");
        assert_eq!(tcp("[::1]:3000"), "[::1]:3000");
        assert_eq!(tcp("localhost:80"), "127.0.0.1:80");
        assert_eq!(tcp(":8080"), "0.0.0.0:8080");
        assert_eq!(
            "unix:/tmp/a.sock".parse::<ListenAddr>(),
            Ok(ListenAddr::Unix("/tmp/a.sock".into()))
        );
        assert!("70000"
            .parse::<ListenAddr>()
            .unwrap_err()
            .contains("out of range"));
        assert!("example.com:80"
            .parse::<ListenAddr>()
            .unwrap_err()
            .contains("not an IP"));
        assert!("1.2.3.4:http"
            .parse::<ListenAddr>()
            .unwrap_err()
            .contains("not a port"));
        assert!("unix:".parse::<ListenAddr>().is_err());
        let long = format!("unix:/{}", "a".repeat(200));
        assert!(long
            .parse::<ListenAddr>()
            .unwrap_err()
            .contains("longer than"));
    }

    #[test]
    fn env_pairs() {
        assert_eq!(parse_env("A=1"), Ok(("A".into(), "1".into())));
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env("A").is_err());
        assert!(parse_env("1A=x").is_err());
        assert!(parse_env("A-B=x").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("300M"), Ok(300 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1.5GB"), Ok(3 << 29));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("3X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("M").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn ready_forms() {
        assert_eq!("notify".parse::<Ready>(), Ok(Ready::Notify));
        assert_eq!(
            "delay:2s".parse::<Ready>(),
            Ok(Ready::Delay(Duration::from_secs(2)))
        );
        assert!("soon".parse::<Ready>().is_err());
    }

    #[test]
    fn names() {
        assert!(valid_name("web-1.api_v2"));
        assert!(!valid_name(""));
        assert!(!valid_name("../x"));
        assert!(!valid_name("a b"));
    }
}
