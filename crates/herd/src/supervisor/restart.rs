//! Crash-restart policy: exponential backoff that resets once a worker proves stable, and a
//! limit on unstable restarts in a row after which the slot is given up ("errored").
//!
//! Pure arithmetic, so it is tested without processes or clocks.

use std::time::Duration;

use crate::spec::Policy;

/// The longest wait between two restarts of one slot.
pub const MAX_DELAY: Duration = Duration::from_secs(15);
const FACTOR: f64 = 1.5;

#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    next: Duration,
    /// Exits in a row that came before `min_uptime`.
    pub unstable: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Restart(Duration),
    GiveUp,
}

impl Backoff {
    pub fn new(policy: &Policy) -> Self {
        Backoff {
            next: policy.restart_delay,
            unstable: 0,
        }
    }

    /// Decides what to do after a worker that ran for `uptime` exited on its own.
    pub fn on_exit(&mut self, uptime: Duration, policy: &Policy) -> Verdict {
        if uptime >= policy.min_uptime {
            self.unstable = 0;
            self.next = policy.restart_delay;
        } else {
            self.unstable += 1;
            if self.unstable > policy.max_restarts {
                return Verdict::GiveUp;
            }
        }
        let delay = self.next;
        self.next = self.next.mul_f64(FACTOR).min(MAX_DELAY).max(delay);
        Verdict::Restart(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_restarts: u32) -> Policy {
        Policy {
            restart_delay: Duration::from_millis(100),
            min_uptime: Duration::from_secs(1),
            max_restarts,
            ..Policy::default()
        }
    }

    #[test]
    fn backoff_grows_by_half_and_caps() {
        let p = policy(100);
        let mut b = Backoff::new(&p);
        let quick = Duration::from_millis(10);
        let delays: Vec<_> = (0..4).map(|_| b.on_exit(quick, &p)).collect();
        assert_eq!(
            delays,
            [100, 150, 225, 337].map(|ms| Verdict::Restart(Duration::from_micros(
                ms * 1000 + if ms == 337 { 500 } else { 0 }
            )))
        );
        for _ in 0..20 {
            b.on_exit(quick, &p);
        }
        assert_eq!(b.on_exit(quick, &p), Verdict::Restart(MAX_DELAY));
    }

    #[test]
    fn a_stable_run_resets_the_backoff() {
        let p = policy(100);
        let mut b = Backoff::new(&p);
        for _ in 0..5 {
            b.on_exit(Duration::ZERO, &p);
        }
        assert_eq!(
            b.on_exit(Duration::from_secs(2), &p),
            Verdict::Restart(Duration::from_millis(100))
        );
        assert_eq!(b.unstable, 0);
    }

    #[test]
    fn too_many_unstable_restarts_give_up() {
        let p = policy(3);
        let mut b = Backoff::new(&p);
        for _ in 0..3 {
            assert!(matches!(b.on_exit(Duration::ZERO, &p), Verdict::Restart(_)));
        }
        assert_eq!(b.on_exit(Duration::ZERO, &p), Verdict::GiveUp);
        let mut none = Backoff::new(&policy(0));
        assert_eq!(none.on_exit(Duration::ZERO, &policy(0)), Verdict::GiveUp);
    }
}
