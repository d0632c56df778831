//! The operating system as the supervisor uses it: starting a worker, signalling its
//! process group, and reading its memory and CPU from /proc — one small trait, [`Os`].
//!
//! [`System`] is the real one (spawn.rs, procfs.rs). Tests hand the supervisor a recording
//! fake instead (`os::fake::FakeOs`), whose workers are driven by the test, so restart,
//! reload and health logic runs under paused tokio time without a process. What stays real
//! in a test is only what has no OS effect worth faking: a worker's notify socket is still
//! bound in the run directory, and its exit still reaches the supervisor through the task
//! that awaits [`Spawned::exit`].

#[cfg(test)]
pub mod fake;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::process::{ChildStderr, ChildStdout, ExitStatus};

use rustix::process::Signal;

use crate::spawn::{self, Leader, SpawnRequest};

/// Starting, signalling and measuring worker processes.
pub trait Os {
    /// Starts a worker as `req` says. The caller must await [`Spawned::exit`] (it reaps).
    fn launch(&self, req: &SpawnRequest<'_>) -> io::Result<Spawned>;

    /// Signals the worker's process group, only while its leader is unreaped (see
    /// [`Leader`]). Returns whether a signal was sent.
    fn signal_group(&self, leader: &Leader, signal: Signal) -> bool;

    /// Resident memory of `pid` in bytes.
    fn rss_bytes(&self, pid: u32) -> Option<u64>;

    /// CPU ticks (user + system) `pid` has used.
    fn cpu_ticks(&self, pid: u32) -> Option<u64>;
}

/// A started worker.
/// Resolves once a worker has exited and is reaped ([`Spawned::exit`]).
pub type Exit = Pin<Box<dyn Future<Output = io::Result<ExitStatus>>>>;

pub struct Spawned {
    pub pid: u32,
    /// Its process group; signals go through it.
    pub leader: Leader,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
    /// Resolves once the worker has exited and what was left of its group is killed; only
    /// then is it reaped and `leader` marked so ([`spawn::wait_exit`]).
    pub exit: Exit,
}

/// The real OS.
pub struct System;

impl Os for System {
    fn launch(&self, req: &SpawnRequest<'_>) -> io::Result<Spawned> {
        let mut child = spawn::spawn(req)?;
        let pid = child.id();
        let leader = Leader::new(pid);
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let exit = Box::pin(spawn::wait_exit(child, leader.clone()));
        Ok(Spawned {
            pid,
            leader,
            stdout,
            stderr,
            exit,
        })
    }

    fn signal_group(&self, leader: &Leader, signal: Signal) -> bool {
        leader.signal_group(signal)
    }

    fn rss_bytes(&self, pid: u32) -> Option<u64> {
        crate::procfs::rss_bytes(pid)
    }

    fn cpu_ticks(&self, pid: u32) -> Option<u64> {
        crate::procfs::cpu_ticks(pid)
    }
}
