//! The app's phase: running, running an operation (reload, restart, scale, a health
//! replacement), or stopping.
//!
//! ```text
//! Running ──begin──▶ Operating(op) ──finish──▶ Running
//! Operating(replace) ──a reload takes it over──▶ Operating(reload)
//! Running, Operating(op) ──stop──▶ Stopping{code, forced: false, op}
//! Stopping{forced: false} ──second SIGINT──▶ Stopping{forced: true}
//! ```
//!
//! An operation interrupted by a stop stays with the phase: the exits the stop causes may
//! still finish or fail it, and its caller gets that answer. Nothing leaves `Stopping`: the
//! supervisor ends once every worker is gone. Each change is a method that refuses what the
//! picture does not have; [`super::Supervisor::change_phase`] records it.

use super::ops::{Op, OpKind};

pub enum AppPhase {
    /// Serving, nothing in progress: an operation may begin.
    Running,
    /// One operation in progress; `op.kind` says which.
    Operating(Op),
    /// Every worker is asked to stop; herd exits with `code` once they are gone. `forced`:
    /// a second SIGINT killed them.
    Stopping {
        code: i32,
        forced: bool,
        op: Option<Op>,
    },
}

/// A phase change the machine does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub from: &'static str,
    pub to: &'static str,
}

impl AppPhase {
    /// The phase's name, as `herd status` shows it (`AppStatus.state` adds `errored`).
    pub fn name(&self) -> &'static str {
        match self {
            AppPhase::Running => "running",
            AppPhase::Operating(op) => op.kind.state_name(),
            AppPhase::Stopping { .. } => "stopping",
        }
    }

    pub fn is_stopping(&self) -> bool {
        matches!(self, AppPhase::Stopping { .. })
    }

    pub fn op(&self) -> Option<&Op> {
        match self {
            AppPhase::Operating(op) => Some(op),
            AppPhase::Stopping { op, .. } => op.as_ref(),
            AppPhase::Running => None,
        }
    }

    pub fn op_mut(&mut self) -> Option<&mut Op> {
        match self {
            AppPhase::Operating(op) => Some(op),
            AppPhase::Stopping { op, .. } => op.as_mut(),
            AppPhase::Running => None,
        }
    }

    /// Running → Operating.
    pub fn begin(&mut self, op: Op) -> Result<(), Invalid> {
        if !matches!(self, AppPhase::Running) {
            return Err(Invalid {
                from: self.name(),
                to: op.kind.state_name(),
            });
        }
        *self = AppPhase::Operating(op);
        Ok(())
    }

    /// The operation in progress ends (done or failed): Operating → Running; while
    /// stopping, the phase stays. `None` when none was in progress.
    pub fn finish(&mut self) -> Option<Op> {
        match self {
            AppPhase::Operating(_) => match std::mem::replace(self, AppPhase::Running) {
                AppPhase::Operating(op) => Some(op),
                _ => None,
            },
            AppPhase::Stopping { op, .. } => op.take(),
            AppPhase::Running => None,
        }
    }

    /// A reload asked for during a health replacement takes it over: Operating(replace) →
    /// Operating(reload).
    pub fn take_over(&mut self, kind: OpKind) -> Result<&mut Op, Invalid> {
        let from = self.name();
        match self {
            AppPhase::Operating(op) if matches!(op.kind, OpKind::Replace { .. }) => {
                op.kind = kind;
                Ok(op)
            }
            _ => Err(Invalid {
                from,
                to: kind.state_name(),
            }),
        }
    }

    /// Running or Operating → Stopping.
    pub fn stop(&mut self, code: i32) -> Result<(), Invalid> {
        let op = match std::mem::replace(self, AppPhase::Running) {
            AppPhase::Running => None,
            AppPhase::Operating(op) => Some(op),
            stopping @ AppPhase::Stopping { .. } => {
                *self = stopping;
                return Err(Invalid {
                    from: "stopping",
                    to: "stopping",
                });
            }
        };
        *self = AppPhase::Stopping {
            code,
            forced: false,
            op,
        };
        Ok(())
    }

    /// A graceful stop becomes a forced one (every worker is killed).
    pub fn force(&mut self) -> Result<(), Invalid> {
        match self {
            AppPhase::Stopping { forced, .. } if !*forced => {
                *forced = true;
                Ok(())
            }
            _ => Err(Invalid {
                from: self.name(),
                to: "stopping",
            }),
        }
    }

    /// The exit code, once stopping.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            AppPhase::Stopping { code, .. } => Some(*code),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: OpKind) -> Op {
        Op::new(kind, None)
    }

    #[test]
    fn an_operation_runs_between_two_running_phases() {
        let mut p = AppPhase::Running;
        p.begin(op(OpKind::Reload { parallel: 1 })).expect("begin");
        assert_eq!(p.name(), "reloading");
        assert!(p.begin(op(OpKind::Restart)).is_err(), "one at a time");
        assert_eq!(p.name(), "reloading");
        assert!(p.finish().is_some());
        assert_eq!(p.name(), "running");
        assert!(p.finish().is_none());
    }

    #[test]
    fn phase_names_are_todays_status_strings() {
        let names: Vec<&str> = [
            OpKind::Reload { parallel: 2 },
            OpKind::Restart,
            OpKind::Scale { to: 3 },
            OpKind::Replace {
                instance: 0,
                reason: herd_proto::control::Reason::Memory,
            },
        ]
        .into_iter()
        .map(|k| {
            let mut p = AppPhase::Running;
            p.begin(op(k)).expect("begin");
            p.name()
        })
        .collect();
        assert_eq!(names, ["reloading", "restarting", "scaling", "replacing"]);
    }

    #[test]
    fn only_a_replacement_can_be_taken_over_by_a_reload() {
        let mut p = AppPhase::Running;
        let reload = OpKind::Reload { parallel: 1 };
        assert!(p.take_over(reload).is_err());
        p.begin(op(OpKind::Scale { to: 2 })).expect("begin");
        assert!(p.take_over(reload).is_err());
        let mut p = AppPhase::Running;
        p.begin(op(OpKind::Replace {
            instance: 1,
            reason: herd_proto::control::Reason::Age,
        }))
        .expect("begin");
        p.take_over(reload).expect("take over");
        assert_eq!(p.name(), "reloading");
    }

    #[test]
    fn a_stop_keeps_the_interrupted_operation_and_never_ends() {
        let mut p = AppPhase::Running;
        p.begin(op(OpKind::Restart)).expect("begin");
        p.stop(3).expect("stop");
        assert_eq!((p.name(), p.exit_code()), ("stopping", Some(3)));
        assert!(p.op().is_some(), "its caller still gets an answer");
        assert!(p.stop(0).is_err(), "a second stop is a bug");
        assert!(p.begin(op(OpKind::Restart)).is_err());
        assert!(p.finish().is_some());
        assert_eq!(
            p.exit_code(),
            Some(3),
            "finishing the op does not leave Stopping"
        );
        p.force().expect("force");
        assert!(p.force().is_err());
        assert!(matches!(p, AppPhase::Stopping { forced: true, .. }));
        assert!(AppPhase::Running.force().is_err());
    }
}
