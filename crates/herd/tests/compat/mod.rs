//! Compatibility and robustness of the modes where herd and workers share sockets
//! (issues #10, #11): hostile workers against herd's own accepts, worker-declared
//! readiness, giving up on an app that crashes at start, refusing while nothing serves.

mod nonblock;
mod refuse;
mod startup;
mod unready;
