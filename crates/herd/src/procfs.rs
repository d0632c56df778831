//! CPU time and memory of a process, read from `/proc`.

use tokio::time::Instant;

/// CPU ticks (user + system) a process has used, from `/proc/PID/stat`.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_ascii_whitespace();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Resident memory in bytes, from `/proc/PID/statm`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

fn ticks_per_second() -> f64 {
    rustix::param::clock_ticks_per_second() as f64
}

/// CPU use between two readings, as percent of one core.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    at: Instant,
    ticks: u64,
}

impl CpuSample {
    /// A reading of `ticks` ([`cpu_ticks`]) taken now.
    pub fn now(ticks: u64) -> Self {
        CpuSample {
            at: Instant::now(),
            ticks,
        }
    }

    /// The reading of a process that started at `at` (no CPU used yet).
    pub fn at_start(at: Instant) -> Self {
        CpuSample { at, ticks: 0 }
    }

    /// Percent of one core used since `earlier`.
    pub fn percent_since(&self, earlier: &CpuSample) -> f64 {
        let secs = self.at.duration_since(earlier.at).as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        let used = self.ticks.saturating_sub(earlier.ticks) as f64 / ticks_per_second();
        (used / secs * 100.0 * 10.0).round() / 10.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_process() {
        let me = std::process::id();
        assert!(rss_bytes(me).expect("rss") > 100_000);
        let before = CpuSample::now(cpu_ticks(me).expect("cpu"));
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 200 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let after = CpuSample::now(cpu_ticks(me).expect("cpu"));
        assert!(after.percent_since(&before) > 20.0, "{x}");
        assert!(cpu_ticks(u32::MAX).is_none());
    }
}
