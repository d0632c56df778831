//! A rolling reload onto a new spec (`herd apply`, control request `reconfigure`).
//!
//! The new `herd run` argv is parsed exactly as the command line is ([`crate::config`]),
//! resolved against the running plan ([`crate::plan::replan`]: same sockets, same worker
//! count) and checked for what a reload cannot change — the listening sockets and how
//! connections reach workers belong to the running supervisor, so `--listen`, `--balance`,
//! `--name`, `--user` and `--log-format` are refused with the reason. Otherwise the new plan
//! becomes the one new workers start from and an ordinary rolling reload runs
//! ([`super::ops`]). If that reload fails (a new worker not ready, an exit), the previous
//! plan and argv come back: the app keeps the workers and the spec it had. Workers that
//! were already replaced before the failure keep running the new version, as with
//! `herd reload`; the failure message counts them.

use std::rc::Rc;

use herd_proto::control::Response;
use herd_proto::event::EventName;
use tokio::sync::oneshot;

use super::ops::OpKind;
use super::Supervisor;
use crate::plan::Plan;
use crate::spec::Spec;

/// Where a running app came from.
#[derive(Default)]
pub struct Origin {
    /// The herd.toml (absolute path), if any.
    pub config: Option<String>,
    /// The `herd run` argv (after `run`) its current workers were started with.
    pub args: Vec<String>,
    /// During a reload onto a new spec: the plan and argv to restore if it fails.
    previous: Option<(Rc<Plan>, Vec<String>)>,
}

/// The fields of `new` that differ from `old` and that a rolling reload cannot change, by
/// their flag.
pub fn fixed_changes(old: &Spec, new: &Spec) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.listen != new.listen {
        changed.push("--listen");
    }
    if old.balance != new.balance {
        changed.push("--balance");
    }
    if old.name != new.name {
        changed.push("--name");
    }
    if old.user != new.user {
        changed.push("--user");
    }
    if old.group != new.group {
        changed.push("--group");
    }
    if old.log_format != new.log_format {
        changed.push("--log-format");
    }
    changed
}

impl Supervisor {
    /// Records where the app came from (`herd ls`, `herd status --json`).
    pub fn set_origin(&mut self, config: Option<String>, args: Vec<String>) {
        self.origin.config = config;
        self.origin.args = args;
    }

    pub(super) fn origin(&self) -> &Origin {
        &self.origin
    }

    /// `reconfigure`: swaps in the new plan for new workers and starts a rolling reload.
    pub(super) fn reconfigure(
        &mut self,
        parallel: usize,
        args: Vec<String>,
        reply: oneshot::Sender<Response>,
    ) {
        if let Some(op) = self.phase.op() {
            let _ = reply.send(Response::error(format!(
                "a {} is already in progress; wait for it to finish",
                op.kind.name()
            )));
            return;
        }
        if self.phase.is_stopping() {
            let _ = reply.send(Response::error("the app is stopping"));
            return;
        }
        let plan = match self.new_plan(&args) {
            Ok(plan) => plan,
            Err(message) => {
                let _ = reply.send(Response::error(message));
                return;
            }
        };
        let plan = Rc::new(plan);
        let old_args = std::mem::replace(&mut self.origin.args, args);
        let old = std::mem::replace(&mut self.plan, Rc::clone(&plan));
        self.origin.previous = Some((old, old_args));
        self.launcher.set_plan(plan);
        self.logger.event(
            EventName::Reloading,
            None,
            "reloading onto a new spec (herd apply)",
            &[],
        );
        self.begin(
            OpKind::Reload {
                parallel: parallel.max(1),
            },
            Some(reply),
        );
    }

    fn new_plan(&self, args: &[String]) -> Result<Plan, String> {
        let run = crate::config::parse_run(args).map_err(|e| {
            format!(
                "the new spec is not a valid herd run command line: {}",
                crate::config::clap_message(&e)
            )
        })?;
        let spec = run.into_spec();
        let fixed = fixed_changes(&self.plan.spec, &spec);
        if !fixed.is_empty() {
            return Err(format!(
                "{} cannot change with a rolling reload (the sockets and how connections reach workers stay the supervisor's); restart the app instead (herd apply does)",
                fixed.join(", ")
            ));
        }
        let plan = crate::plan::replan(spec, &self.plan).map_err(|e| e.to_string())?;
        if plan.kind != self.plan.kind {
            return Err("the new program is a different kind of worker (Node cluster vs socket activation); restart the app instead".into());
        }
        Ok(plan)
    }

    /// The operation that ended was a reload onto a new spec: keep it, or put the previous
    /// plan back when the reload failed.
    pub(super) fn settle_reconfigure(&mut self, ok: bool) {
        let Some((plan, args)) = self.origin.previous.take() else {
            return;
        };
        if ok {
            return;
        }
        self.origin.args = args;
        self.plan = Rc::clone(&plan);
        self.launcher.set_plan(plan);
        self.logger.event(
            EventName::Warning,
            None,
            "the new spec was not applied: new workers start from the previous one again",
            &[],
        );
    }
}
