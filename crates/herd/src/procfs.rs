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
    use std::time::Duration;

    /// CPU the test burns before it reads the percentage: a fixed amount of our own CPU
    /// time, however long a loaded machine takes to give it.
    const BURN_TICKS: u64 = 20;
    /// How long the busy loop may take to get [`BURN_TICKS`] on a busy machine.
    const BURN_WALL_LIMIT: Duration = Duration::from_secs(120);

    #[test]
    fn reads_our_own_process() {
        let me = std::process::id();
        assert!(rss_bytes(me).expect("rss") > 100_000);
        let before = CpuSample::now(cpu_ticks(me).expect("cpu"));
        let t = Instant::now();
        let mut x = 0u64;
        let mut ticks = before.ticks;
        // Spin until our own tick count moved by BURN_TICKS (a fixed amount of CPU), not
        // for a fixed wall time that a loaded machine may give to someone else.
        while ticks < before.ticks + BURN_TICKS {
            for _ in 0..100_000 {
                x = x.wrapping_add(std::hint::black_box(1));
            }
            assert!(
                t.elapsed() < BURN_WALL_LIMIT,
                "our CPU ticks moved by {} of {BURN_TICKS} in {BURN_WALL_LIMIT:?}",
                ticks - before.ticks
            );
            ticks = cpu_ticks(me).expect("cpu");
        }
        let after = CpuSample::now(cpu_ticks(me).expect("cpu"));
        let used = after.ticks - before.ticks;
        assert!(used >= BURN_TICKS, "{used} ticks ({x})");
        // What the reading must say: the ticks we burnt over the wall time they took
        // (other test threads may add more, never less).
        let secs = after.at.duration_since(before.at).as_secs_f64();
        let least = BURN_TICKS as f64 / ticks_per_second() / secs * 100.0;
        let percent = after.percent_since(&before);
        assert!(
            percent + 0.1 >= least && percent > 0.0,
            "{percent}% after {used} ticks in {secs:.3}s (at least {least:.1}%)"
        );
        assert!(cpu_ticks(u32::MAX).is_none());
        assert!(rss_bytes(u32::MAX).is_none());
    }

    #[test]
    fn percent_is_of_one_core_over_the_wall_time() {
        let t0 = Instant::now();
        let tps = rustix::param::clock_ticks_per_second();
        let start = CpuSample::at_start(t0);
        // One second of CPU in two of wall time: 50 %; two cores for one second: 200 %.
        let half = CpuSample {
            at: t0 + Duration::from_secs(2),
            ticks: tps,
        };
        assert_eq!(half.percent_since(&start), 50.0);
        let two = CpuSample {
            at: t0 + Duration::from_secs(1),
            ticks: 2 * tps,
        };
        assert_eq!(two.percent_since(&start), 200.0);
        // No time passed (or the clock went back): 0, not a division by zero.
        assert_eq!(start.percent_since(&half), 0.0);
        assert_eq!(half.percent_since(&half), 0.0);
    }
}
