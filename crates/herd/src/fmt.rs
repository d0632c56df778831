//! Formatting shared by the supervisor's events and the client commands: durations and
//! exit statuses in words. Two duration forms on purpose: [`human`] for timeouts and delays
//! in event messages (`150ms`, `3.2s`: the precision a setting has), [`duration_ms`] for
//! uptimes in tables (`3h4m`, `1d2h`: two units, whatever the age).

use std::process::ExitStatus;
use std::time::Duration;

/// `code 1`, `signal 9, SIGKILL`.
pub fn describe_status(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("code {code}"),
        (None, Some(sig)) => format!("signal {sig}, {}", signal_name(sig)),
        _ => "unknown status".into(),
    }
}

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        _ => "signal",
    }
}

/// `150ms`, `3.2s`, `2m5s`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}m{}s", ms / 60_000, ms % 60_000 / 1000)
    }
}

/// An uptime for the status tables: `-` (not started), `42s`, `2m5s`, `3h4m`, `1d2h`.
pub fn duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 if ms == 0 => "-".into(),
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptimes_keep_two_units() {
        let shown: Vec<String> = [0, 999, 42_000, 125_000, 11_040_000, 93_600_000]
            .into_iter()
            .map(duration_ms)
            .collect();
        assert_eq!(shown, ["-", "0s", "42s", "2m5s", "3h4m", "1d2h"]);
    }
}
