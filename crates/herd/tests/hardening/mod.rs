//! Hardening: each test plays a hostile worker, a hostile local user or a slow reader, and
//! checks that herd neither freezes, bloats, nor touches a file it should not.
//!
//! - `channel`: the Node IPC channel and connection hand-offs.
//! - `paths`: unix-socket paths and ports a worker asks for.
//! - `health`: probe connections, notify sockets, the run directory, signalling.
//! - `control`: app names, control sockets, the control protocol.
//! - `output`: a slow or blocked stdout, log line limits, terminal escapes.

mod channel;
mod control;
mod health;
mod output;
mod paths;
