//! What a slot (instance 0..N-1) is doing about its worker, as one state.
//!
//! ```text
//! Active ──its worker died, restart after a backoff──▶ RestartDue ──timer fired──▶ Active
//! Active ──herd restart, a worker to stop first──▶ Respawning ──it is gone, next started──▶ Active
//! Active ──crash loop, spawn impossible, --no-autorestart──▶ Errored{why}
//! Errored ──herd restart, a reload's replacement took over──▶ Active
//! RestartDue ──a reload's replacement took over──▶ Active
//! ```
//!
//! `Errored` and `RestartDue` have no worker; `Respawning` has the worker being stopped.
//! Every change goes through [`SlotState::advance`] (from `Supervisor::set_slot_state`),
//! which refuses what the picture does not have.
//!
//! Not in this state, on purpose: whether the slot is *retiring* (`herd scale` down removes
//! it once its worker is gone). That is about the slot's existence, not its worker, and it
//! holds beside three of the four states: an errored slot or one waiting out its backoff can
//! be scaled away (and keeps showing `errored`/`waiting` until it is removed), and an active
//! one drains its worker. Only `Respawning` excludes it (one operation at a time: a restart
//! and a scale never overlap).
//!
//! A restart timer (`Event::RestartDue`) may fire after its slot left `RestartDue` (a
//! reload's replacement filled it meanwhile). It then does what it always did: it starts a
//! worker only if the slot has none and is neither errored nor retiring.

/// A slot's plan for its worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    /// Has its worker (or is starting one); nothing pending.
    Active,
    /// Its worker died unexpectedly; a timer starts the next one after the backoff.
    RestartDue,
    /// `herd restart`: its worker is being stopped; the next one starts once it is gone.
    Respawning,
    /// Given up: no worker until `herd restart` or a reload. `why`: the last exit or the
    /// spawn error, shown as its last exit.
    Errored { why: String },
}

/// A slot state change the machine does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub from: &'static str,
    pub to: &'static str,
}

impl SlotState {
    /// The state's name in logs.
    pub fn name(&self) -> &'static str {
        match self {
            SlotState::Active => "active",
            SlotState::RestartDue => "restart_due",
            SlotState::Respawning => "respawning",
            SlotState::Errored { .. } => "errored",
        }
    }

    /// Moves to `next` if the machine has that transition.
    pub fn advance(&mut self, next: SlotState) -> Result<(), Invalid> {
        use SlotState::*;
        let ok = matches!(
            (&*self, &next),
            (Active, RestartDue | Respawning | Errored { .. })
                | (RestartDue | Respawning | Errored { .. }, Active)
        );
        if !ok {
            return Err(Invalid {
                from: self.name(),
                to: next.name(),
            });
        }
        *self = next;
        Ok(())
    }

    /// Given up; `why` is shown as the slot's last exit.
    pub fn errored(&self) -> Option<&str> {
        match self {
            SlotState::Errored { why } => Some(why),
            _ => None,
        }
    }

    pub fn is_errored(&self) -> bool {
        self.errored().is_some()
    }

    /// Waiting out its backoff: its restart timer will start the next worker.
    pub fn is_restart_due(&self) -> bool {
        matches!(self, SlotState::RestartDue)
    }

    /// A restart waits for its worker to go before it starts the next.
    pub fn is_respawning(&self) -> bool {
        matches!(self, SlotState::Respawning)
    }

    /// The state a slot moves to when it gets a worker by other means than its own timer
    /// (a reload's replacement, `herd restart`): `Active`, unless it already is, or is
    /// respawning (its successor is on the way).
    pub fn on_filled(&self) -> Option<SlotState> {
        match self {
            SlotState::RestartDue | SlotState::Errored { .. } => Some(SlotState::Active),
            SlotState::Active | SlotState::Respawning => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SlotState::*;

    fn errored() -> SlotState {
        Errored {
            why: "code 1".into(),
        }
    }

    #[test]
    fn a_crash_waits_out_its_backoff_then_the_slot_is_active_again() {
        let mut s = Active;
        s.advance(RestartDue).expect("crash");
        assert!(s.is_restart_due() && !s.is_errored());
        s.advance(Active).expect("timer fired");
        assert_eq!(s, Active);
    }

    #[test]
    fn a_restart_respawns_an_active_slot_and_revives_an_errored_one() {
        let mut s = Active;
        s.advance(Respawning).expect("herd restart");
        assert!(s.is_respawning());
        s.advance(Active).expect("its successor started");
        s.advance(errored()).expect("crash loop");
        assert_eq!(s.errored(), Some("code 1"));
        assert_eq!(s.on_filled(), Some(Active));
        s.advance(Active).expect("herd restart");
        assert!(!s.is_errored());
    }

    #[test]
    fn filling_a_slot_leaves_an_active_or_respawning_one_alone() {
        assert_eq!(RestartDue.on_filled(), Some(Active));
        assert_eq!(errored().on_filled(), Some(Active));
        assert_eq!(Active.on_filled(), None);
        assert_eq!(Respawning.on_filled(), None);
    }

    #[test]
    fn invalid_changes_are_refused_and_change_nothing() {
        let refused = [
            (Active, Active),
            (RestartDue, Respawning),
            (RestartDue, errored()),
            (RestartDue, RestartDue),
            (Respawning, RestartDue),
            (Respawning, errored()),
            (errored(), RestartDue),
            (errored(), Respawning),
            (errored(), errored()),
        ];
        for (from, to) in refused {
            let mut s = from.clone();
            let err = s.advance(to.clone()).expect_err("invalid");
            assert_eq!((err.from, err.to), (from.name(), to.name()));
            assert_eq!(s, from);
        }
    }
}
