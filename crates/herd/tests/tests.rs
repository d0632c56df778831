//! herd's integration tests: the real binary, real workers (Python socket-activation
//! fixtures, real Node), real sockets on port 0. One test binary, as ripgrep does; the
//! harness is in `util/`, the fixture apps in `fixtures/`.

mod compat;
mod config;
mod control;
mod counter;
mod errors;
mod hardening;
mod health;
mod http;
mod logfiles;
mod monit;
mod node;
mod run;
mod system;
mod util;
